"""Training a memory: losses and loops. Only the memory learns; the backbone stays frozen."""

from locas.training.losses import ntp_loss
from locas.training.offline import train_on_windows

__all__ = ["ntp_loss", "train_on_windows"]
