"""Hugging Face `Trainer` integration: example ids for the gradient-norm cache, and the sampling
state saved with every checkpoint so a resumed run samples exactly as an uninterrupted one."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer

from wtacrs.atomic import atomic_path
from wtacrs.batching import batch
from wtacrs.integrations.checkpoints import last_complete_checkpoint, verify_checkpoint
from wtacrs.integrations.distributed import enable_data_parallel
from wtacrs.learning_rate import scale_param_groups
from wtacrs.modeling import sampling_state

logger = logging.getLogger(__name__)

EXAMPLE_ID_COLUMN = "example_id"
HOST_MASK_KEY = "wtacrs_host_attention_mask"  # the collated mask as a numpy array: no loader moves it
HOST_ANCHORS_KEY = "wtacrs_host_anchors"  # (B, 2) start and end positions (extractive QA), numpy
HOST_TOKEN_TYPES_KEY = "wtacrs_host_token_type_ids"  # (B, T) segment ids, numpy, kept with the anchors
_HOST_KEYS = (HOST_MASK_KEY, HOST_ANCHORS_KEY, HOST_TOKEN_TYPES_KEY)
STATE_FILE = "wtacrs_state.safetensors"


class _WithHostMask:
    """Wraps a data collator: each batch carries its example ids as a numpy array (from the
    features where the collator drops them, `_carry_example_ids`), and host copies,
    as numpy arrays too (which accelerate's loader leaves on the host when it moves the tensors to
    the GPU), of its attention mask, so the training step can count live rows and read the cache without copying the mask
    back, and, when it has "start_positions" and "end_positions" (extractive QA), of those label
    positions and of its token_type_ids, which key the first-visit scores (`wtacrs.batch(anchors=)`)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        if not isinstance(batch, dict):
            return batch
        _carry_example_ids(batch, features)
        if _on_host(batch.get(EXAMPLE_ID_COLUMN)):  # the step reads them on the host: no copy back
            batch[EXAMPLE_ID_COLUMN] = batch[EXAMPLE_ID_COLUMN].numpy()
        mask = batch.get("attention_mask")
        if _on_host(mask):
            batch[HOST_MASK_KEY] = mask.numpy()
            start, end = batch.get("start_positions"), batch.get("end_positions")
            if _on_host(start) and _on_host(end) and start.dim() == end.dim() == 1:
                batch[HOST_ANCHORS_KEY] = torch.stack([start, end], 1).to(torch.int64).numpy()
                types = batch.get("token_type_ids")
                if _on_host(types):
                    batch[HOST_TOKEN_TYPES_KEY] = types.numpy()
        return batch


def _carry_example_ids(batch: dict[str, Any], features: list) -> None:
    """Put the features' example ids into `batch` as a (B,) int64 tensor where the collator
    dropped them (TRL's language-modeling collator keeps only the model's inputs) and each feature
    is one row of `batch["input_ids"]` (B rows); a padding-free batch, whose one row joins several
    features in an order that changes every epoch, has no stable id and gets none."""
    if EXAMPLE_ID_COLUMN in batch or not features:
        return
    if not all(isinstance(f, Mapping) and EXAMPLE_ID_COLUMN in f for f in features):
        return
    rows = batch.get("input_ids")
    if isinstance(rows, torch.Tensor) and rows.dim() >= 1 and rows.shape[0] == len(features):
        batch[EXAMPLE_ID_COLUMN] = torch.tensor([int(f[EXAMPLE_ID_COLUMN]) for f in features], dtype=torch.int64)


def _on_host(value) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "cpu"


def add_example_ids(dataset, column: str = EXAMPLE_ID_COLUMN):
    """Add an integer column with each example's index (a `datasets.Dataset`), so that the
    collator carries ids into every batch. Ids must stay the same across epochs: add them
    before shuffling or filtering, never per epoch."""
    if column in dataset.column_names:
        raise ValueError(f"dataset already has a {column!r} column")
    return dataset.map(lambda _, index: {column: index}, with_indices=True)


class WTACRSTrainer(Trainer):
    """`transformers.Trainer` for models prepared with `wtacrs.apply`.

    - Pops the "example_id" column from each batch and runs the step inside `wtacrs.batch`, so
      sampling uses the gradient-norm cache; batches with start and end positions (extractive QA)
      pass them as anchors, which score examples not in the cache yet. Without the column, sampling falls back to
      activation-norm scores (still unbiased) and says so once.
    - Keeps "example_id" from being dropped by `remove_unused_columns`.
    - Saves the sampling state (step counter and cache) into each checkpoint and restores it
      on `train(resume_from_checkpoint=...)`.
    - `lr_scales` ({sampled module name: factor}, e.g. `wtacrs.learning_rate.lr_scales` of the
      measured noise): each named module's weight trains at the learning rate times its factor.
    - With `TrainingArguments(torch_compile=True)`, runs each step as `wtacrs.batch(ids, mask,
      model=model)`: the step's host work (cache lookup, row layout, the draws' key) happens
      before the forward and after the backward, so the compiled model runs no host code and
      has no graph break in the sampled layers.
    """

    def __init__(self, *args, lr_scales: dict[str, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_collator = _WithHostMask(self.data_collator)
        self.lr_scales = lr_scales

    def create_optimizer(self, model=None):
        """`Trainer.create_optimizer`, then each module of `lr_scales` in a group of its own."""
        optimizer = super().create_optimizer(model)
        if self.lr_scales:
            scale_param_groups(optimizer, self._unwrapped(), self.lr_scales)
        return optimizer

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if EXAMPLE_ID_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, EXAMPLE_ID_COLUMN]

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`, checking the whole checkpoint before loading any of it (True = the
        newest complete checkpoint in output_dir)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no complete checkpoint in {self.args.output_dir} to resume from")
        if resume_from_checkpoint:
            verify_checkpoint(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, **kwargs)

    def training_step(self, model, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        enable_data_parallel(self._unwrapped())  # no-op unless torch.distributed runs several ranks
        ids = inputs.pop(EXAMPLE_ID_COLUMN, None)
        host_mask, anchors, token_types = (inputs.pop(key, None) for key in _HOST_KEYS)
        ids, host_mask, anchors, token_types = (None if a is None else torch.as_tensor(a)
                                                for a in (ids, host_mask, anchors, token_types))
        # the host mask plans the step at the block's enter (no copy back from the device, nothing
        # left for a compiled forward to do on the host); anchors score first visits
        with batch(ids, host_mask, anchors=anchors, token_type_ids=token_types):
            return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        for key in (EXAMPLE_ID_COLUMN, *_HOST_KEYS):
            inputs.pop(key, None)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _save_checkpoint(self, model, trial) -> None:
        # Fold the last steps' norms first: a PaddingGradientError they carry is raised before
        # anything of the checkpoint is written.
        sampling_state(self._unwrapped()).flush()
        super()._save_checkpoint(model, trial)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self.args.should_save:
            with atomic_path(os.path.join(output_dir, STATE_FILE)) as tmp:
                save_file(sampling_state(self._unwrapped()).state_dict(), tmp)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        path = None if checkpoint is None else os.path.join(checkpoint, STATE_FILE)
        if path is not None and os.path.isfile(path):
            sampling_state(self._unwrapped()).load_state_dict(load_file(path))
        elif checkpoint is not None:
            logger.warning("wtacrs: %s has no %s; the gradient-norm cache starts empty", checkpoint, STATE_FILE)

    def _unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)
