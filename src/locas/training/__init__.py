"""Training a memory: losses and loops. Only the memory (or a LoRA baseline's adapter) learns.

`config` (the settings) imports without torch; the names below are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from locas.lazy_imports import lazy_names

if TYPE_CHECKING:
    from locas.training.losses import LOSSES, LossInputs
    from locas.training.offline import train_on_windows

_MODULE_OF = {
    "LOSSES": "locas.training.losses",
    "LossInputs": "locas.training.losses",
    "train_on_windows": "locas.training.offline",
}
__all__ = ["LOSSES", "LossInputs", "train_on_windows"]

__getattr__, __dir__ = lazy_names(__name__, _MODULE_OF)
