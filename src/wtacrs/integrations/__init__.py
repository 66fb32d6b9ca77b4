"""Integrations with training loops and model libraries (Transformers Trainer, TRL SFTTrainer, attention registry).

Plain PyTorch and `accelerate` loops need nothing from here: wrap each step in `wtacrs.batch(ids)`.
"""

from wtacrs.integrations.trainer import EXAMPLE_ID_COLUMN, WTACRSTrainer, add_example_ids

__all__ = ["EXAMPLE_ID_COLUMN", "WTACRSTrainer", "WTACRSSFTTrainer", "add_example_ids"]


def __getattr__(name: str):
    if name == "WTACRSSFTTrainer":  # imports trl, which the library does not need otherwise
        from wtacrs.integrations.trl import WTACRSSFTTrainer

        return WTACRSSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
