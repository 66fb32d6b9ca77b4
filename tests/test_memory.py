"""The saved-tensor walk agrees with the saved_tensors_hooks count and names the ops."""

import contextlib

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import wtacrs
from wtacrs.memory import AllocatorPeak, SavedTensorBytes, parameter_tensors, saved_bytes_by_op, saved_tensors_by_op


def test_graph_walk_matches_hook_count_on_a_sampled_bert():
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=99)
    ).train()
    wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    batch = {"input_ids": torch.randint(0, 99, (3, 16)), "labels": torch.tensor([0, 1, 0])}
    with SavedTensorBytes(exclude=parameter_tensors(model)) as saved:
        with wtacrs.batch(torch.arange(3)):
            loss = model(**batch).loss
    records = saved_tensors_by_op(loss, exclude=parameter_tensors(model))
    assert sum(r.nbytes for r in records) == saved.total
    by_op = {op: nbytes for op, nbytes, _ in saved_bytes_by_op(records)}
    assert by_op["_LinearWithRowSampleBackward"] > 0
    assert by_op.get("AddmmBackward0", 0) < by_op["_LinearWithRowSampleBackward"]  # only the heads stay plain


def test_counting_saved_bytes_leaves_a_tied_weights_gradient_summed_in_place():
    """The chunked LM loss hands back a saved tensor as the head's gradient; the embedding's is
    added to it in place, unless the counter gave that storage a second owner (a Python storage
    object), which costs one more weight-sized tensor at the end of backward."""
    from wtacrs.companions.lm_loss import chunked_lm_loss

    torch.manual_seed(0)
    emb = nn.Embedding(1024, 64)
    head = nn.Linear(64, 1024, bias=False)
    head.weight = emb.weight
    ids = torch.randint(0, 1024, (2, 16))
    peaks = []
    for counting in (False, True):
        emb.weight.grad = None
        with AllocatorPeak([emb.weight, ids]) as live:
            with SavedTensorBytes() if counting else contextlib.nullcontext():
                loss = chunked_lm_loss(torch.tanh(emb(ids)), ids, head)
            loss.backward()
        peaks.append(live.peak)
    assert peaks[1] == peaks[0] and peaks[0] - live.baseline < 2.5 * emb.weight.nbytes
