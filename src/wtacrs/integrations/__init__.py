"""Integrations with training loops and model libraries (Transformers Trainer, attention registry).

Plain PyTorch and `accelerate` loops need nothing from here: wrap each step in `wtacrs.batch(ids)`.
"""

from wtacrs.integrations.trainer import EXAMPLE_ID_COLUMN, WTACRSTrainer, add_example_ids

__all__ = ["EXAMPLE_ID_COLUMN", "WTACRSTrainer", "add_example_ids"]
