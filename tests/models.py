"""Tiny randomly initialised models of every covered architecture, with a batch for each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import transformers as hf

VOCAB = 99
BATCH, SEQ = 3, 10
SMALL = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
              max_position_embeddings=64)


@dataclass
class Case:
    name: str
    build: Callable[[], torch.nn.Module]
    padding: str = "right"
    text_to_text: bool = False

    def model(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = self.build()
        model.train()
        return model

    def batch(self, seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
        lengths = torch.tensor([SEQ, 6, 8])
        positions = torch.arange(SEQ).expand(BATCH, SEQ)
        real = positions < lengths[:, None] if self.padding == "right" else positions >= SEQ - lengths[:, None]
        ids = torch.where(real, ids, 0)
        batch = {"input_ids": ids, "attention_mask": real.long()}
        if self.text_to_text:
            batch["labels"] = torch.randint(3, VOCAB, (BATCH, 4), generator=g)
        else:
            batch["labels"] = torch.tensor([0, 1, 1])
        return batch


def _cls(config_cls, model_cls, **kwargs):
    return lambda: model_cls(config_cls(**{**SMALL, "num_labels": 2, "pad_token_id": 0, **kwargs}))


CASES = [
    Case("bert", _cls(hf.BertConfig, hf.BertForSequenceClassification, hidden_size=32)),
    Case("roberta", _cls(hf.RobertaConfig, hf.RobertaForSequenceClassification, hidden_size=32, bos_token_id=1,
                         eos_token_id=2)),
    Case("distilbert", lambda: hf.DistilBertForSequenceClassification(
        hf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64,
                            pad_token_id=0))),
    Case("albert", _cls(hf.AlbertConfig, hf.AlbertForSequenceClassification, hidden_size=32, embedding_size=16)),
    Case("electra", _cls(hf.ElectraConfig, hf.ElectraForSequenceClassification, hidden_size=32, embedding_size=16)),
    Case("mpnet", _cls(hf.MPNetConfig, hf.MPNetForSequenceClassification, hidden_size=32)),
    Case("deberta-v2", _cls(hf.DebertaV2Config, hf.DebertaV2ForSequenceClassification, hidden_size=32)),
    Case("t5", lambda: hf.T5ForConditionalGeneration(
        hf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, pad_token_id=0,
                    decoder_start_token_id=0)),
        text_to_text=True),
    Case("gpt2", lambda: hf.GPT2ForSequenceClassification(
        hf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, pad_token_id=0, num_labels=2))),
    Case("llama", lambda: hf.LlamaForSequenceClassification(
        hf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
                       num_labels=2)),
        padding="left"),
]
CASES_BY_NAME = {c.name: c for c in CASES}
# Not in CASES (whose every test it would lengthen): the end-to-end matrix and the README's
# families table take it as one family more.
MODERNBERT = Case("modernbert", _cls(hf.ModernBertConfig, hf.ModernBertForSequenceClassification, hidden_size=32))
FAMILIES = [*CASES, MODERNBERT]
