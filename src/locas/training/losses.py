"""Training losses for a memory. Each takes the LocasModel and a batch, and returns a scalar loss."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from locas.model import token_nll

if TYPE_CHECKING:
    from locas.model import LocasModel


def ntp_loss(model: LocasModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy, summed over the predicted (non-padding) tokens."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return token_nll(logits, input_ids, attention_mask).sum()
