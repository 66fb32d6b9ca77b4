"""The saved-tensor walk agrees with the saved_tensors_hooks count and names the ops."""

import torch
from transformers import BertConfig, BertForSequenceClassification

import wtacrs
from wtacrs.memory import SavedTensorBytes, parameter_tensors, saved_bytes_by_op, saved_tensors_by_op


def test_graph_walk_matches_hook_count_on_a_sampled_bert():
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=99)
    ).train()
    wtacrs.apply(model, wtacrs.WTACRSConfig(ratio=0.3))
    batch = {"input_ids": torch.randint(0, 99, (3, 16)), "labels": torch.tensor([0, 1, 0])}
    with SavedTensorBytes(exclude=parameter_tensors(model)) as saved:
        with wtacrs.batch(torch.arange(3)):
            loss = model(**batch).loss
    records = saved_tensors_by_op(loss, exclude=parameter_tensors(model))
    assert sum(r.nbytes for r in records) == saved.total
    by_op = {op: nbytes for op, nbytes, _ in saved_bytes_by_op(records)}
    assert by_op["_LinearWithRowSampleBackward"] > 0
    assert by_op.get("AddmmBackward0", 0) < by_op["_LinearWithRowSampleBackward"]  # only the heads stay plain
