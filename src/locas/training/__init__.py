"""Training a memory: losses and loops. Only the memory (or a LoRA baseline's adapter) learns."""

from locas.training.losses import LOSSES, LossInputs
from locas.training.offline import train_on_windows

__all__ = ["LOSSES", "LossInputs", "train_on_windows"]
