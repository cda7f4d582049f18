"""Offline training: several optimiser steps over a fixed text (what `locas memorize --train-steps` runs)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from locas.attention import keys_and_values_per_query_head
from locas.model import token_nll

if TYPE_CHECKING:
    from locas.model import LocasModel


def train_on_windows(
    model: LocasModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    steps: int,
    lr: float = 4e-3,
    progress: bool = True,
) -> list[float]:
    """`steps` AdamW steps of the attached memory on the windows (rows) of `input_ids`, clipping after each.

    Each step accumulates the gradient of the mean next-token loss over all windows, one window at a
    time. Returns the mean loss (nats per token) measured in each step's forward pass, before its update.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    memory = model.memory
    if memory is None:
        raise ValueError("no memory attached: call attach() or memorize() first")
    optimizer = torch.optim.AdamW(memory.parameters(), lr=lr, weight_decay=0.0)
    predicted = int(attention_mask[:, 1:].sum())
    losses = []
    bar = tqdm(range(steps), desc="training memory", unit="step", disable=not progress)
    for _ in bar:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for row in range(input_ids.shape[0]):
            ids = input_ids[row : row + 1].to(model.device)
            mask = attention_mask[row : row + 1].to(model.device)
            with keys_and_values_per_query_head(model.model):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = token_nll(logits, ids, mask).sum()
            (loss / predicted).backward()
            total += loss.item()
        optimizer.step()
        memory.clip_()
        losses.append(total / predicted)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses
