"""TRL integration: `SFTTrainer` for models prepared with `wtacrs.apply` (see docs/trl.md).

Importing this module imports `trl`; `wtacrs.integrations.WTACRSSFTTrainer` imports it only
when first named, so the library itself never needs TRL.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from trl import SFTTrainer

from wtacrs.companions.lm_loss import ChunkedLMLoss
from wtacrs.integrations.trainer import EXAMPLE_ID_COLUMN, WTACRSTrainer, add_example_ids

logger = logging.getLogger(__name__)


class WTACRSSFTTrainer(WTACRSTrainer, SFTTrainer):
    """`trl.SFTTrainer` with everything `WTACRSTrainer` does, for models prepared with
    `wtacrs.apply`: plain language modelling, `packing=True` and completion-only loss alike.

    - Example ids: each prepared (tokenized, truncated, packed) training example gets its index
      as its id, unless the dataset already has an "example_id" column (`add_example_ids`) that
      preparation kept; packing drops that column, and each packed row then gets its own id (the
      packing is the same in every epoch). The ids reach each step through TRL's collator when
      each example is one row of the batch; a padding-free batch (TRL's default with packing,
      strategy "bfd") of several packed rows, joined into one row, has none and samples
      without them (the recommended recipe, which draws in backward, needs none).
      An `IterableDataset`, or `dataset_kwargs={"skip_prepare_dataset": True}`, gets no ids.
    - The chunked LM loss (`WTACRSConfig.chunked_lm_loss`) computes the training loss: SFTTrainer
      calls the model with `fused_lm_head=True`, which skips the model's own loss; here a
      training step with TRL's default loss (`loss_type="nll"`, no `compute_loss_func`, no label
      smoothing, no MoE router loss, no sequence parallelism) calls the model with its labels, so
      the companion computes the same loss in chunks and the (tokens x vocabulary) logits never
      exist. Labels are TRL's: -100 on the prompt under completion-only loss, on the padding, and
      on each packed example's first token. Such steps log TRL's "num_tokens" but not "entropy"
      or "mean_token_accuracy", which need every token's whole distribution. Other steps (eval,
      other losses) take SFTTrainer's own path.
    - The sampling state is saved with every checkpoint and restored on resume, and `lr_scales`
      applies, as in `WTACRSTrainer`.

    Example:
        model = wtacrs.apply(AutoModelForCausalLM.from_pretrained(name))  # the recommended recipe
        trainer = WTACRSSFTTrainer(model=model, args=SFTConfig(out, packing=True, max_length=1024),
                                   train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        chunked = any(isinstance(m, ChunkedLMLoss) for m in self._unwrapped().modules())
        blocker = self._chunked_loss_blocker() if chunked else None
        if blocker:
            logger.warning("wtacrs: the chunked LM loss is not used (%s); SFTTrainer computes the loss", blocker)
        self._chunked_loss_on = chunked and blocker is None

    def _chunked_loss_blocker(self) -> str | None:
        """Why the model's own (chunked) loss cannot be SFTTrainer's training loss, or None."""
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        reasons = [
            (self.args.loss_type != "nll", f"loss_type={self.args.loss_type!r}"),
            (self.compute_loss_func is not None, "compute_loss_func is set"),
            (self.label_smoother is not None, "label smoothing"),
            (self.aux_loss_enabled, "the MoE router loss"),
            (getattr(parallelism, "sp_enabled", False), "sequence parallelism"),
        ]
        return next((reason for blocked, reason in reasons if blocked), None)

    def _prepare_dataset(self, dataset, *args, **kwargs):
        """SFTTrainer's preparation, then each prepared example's index as its id where it has none."""
        dataset = super()._prepare_dataset(dataset, *args, **kwargs)
        if isinstance(dataset, Dataset) and EXAMPLE_ID_COLUMN not in dataset.column_names:
            dataset = add_example_ids(dataset)  # preparation is deterministic: the same ids every epoch
        return dataset

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        """A training step's loss from the model given its labels (the chunked LM loss, class
        docstring), else SFTTrainer's."""
        if return_outputs or not self._chunked_loss_on or not model.training or "shift_labels" in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs["use_cache"] = False
        loss = super(SFTTrainer, self).compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        # SFTTrainer's token count, as its own loss path logs it
        if "attention_mask" in inputs:
            tokens = inputs["attention_mask"].sum()
        else:  # padding-free: one row of real tokens
            tokens = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        self._total_train_tokens += self.accelerator.gather_for_metrics(tokens).sum().item() // self._tp_size
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return loss
