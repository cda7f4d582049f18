"""Training a memory: losses and loops. Only the memory (or a LoRA baseline's adapter) learns.

`config` (the settings) imports without torch; the names below are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from locas.training.losses import LOSSES, LossInputs
    from locas.training.offline import train_on_windows

_MODULE_OF = {
    "LOSSES": "locas.training.losses",
    "LossInputs": "locas.training.losses",
    "train_on_windows": "locas.training.offline",
}
__all__ = ["LOSSES", "LossInputs", "train_on_windows"]


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'locas.training' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
