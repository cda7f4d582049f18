"""Offline training: several optimiser steps over a fixed text (what `locas memorize --train-steps` runs)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from locas.attention import keys_and_values_per_query_head
from locas.model import NO_MEMORY, check_token_ids, token_nll, warn_if_float16

if TYPE_CHECKING:
    from locas.model import LocasModel


def train_on_windows(
    model: LocasModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    steps: int,
    lr: float = 4e-3,
    progress: bool = True,
) -> list[float]:
    """`steps` AdamW steps of the attached memory on the windows (rows) of `input_ids`, clipping after each.

    Each step accumulates the gradient of the mean next-token loss over all windows, one window at a
    time. `attention_mask` None: every token is real. A batch-1 memory serves every window; a memory of
    batch B (e.g. `memorize(..., per_sequence=True)`) trains memory r on window r, for B windows (each
    memory's update is then the one it gets trained alone on its window, up to AdamW's epsilon). Returns
    the mean loss (nats per token) measured in each step's forward pass, before its update.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    memory = model.memory
    if memory is None:
        raise ValueError(NO_MEMORY)
    check_token_ids(model.model, input_ids, attention_mask)
    warn_if_float16(model.model)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    windows = input_ids.shape[0]
    if memory.batch_size not in (1, windows):
        raise ValueError(
            f"the attached memory has a batch of {memory.batch_size} memories, but there are {windows} windows: "
            "a memory of batch B trains memory r on window r (B windows); a batch-1 memory trains on any number"
        )
    predicted = int(attention_mask[:, 1:].sum())
    if predicted == 0:
        raise ValueError(
            "no token to predict: every window needs at least 2 tokens with attention_mask 1 (a window's first "
            "token has no prediction); pass longer windows or the right attention_mask"
        )

    def serving(row: int):  # memory `row` for window `row`; a batch-1 memory as it is
        return model.serving([row]) if memory.batch_size > 1 else nullcontext()

    optimizer = torch.optim.AdamW(memory.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    bar = tqdm(range(steps), desc="training memory", unit="step", disable=not progress)
    for _ in bar:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for row in range(windows):
            ids = input_ids[row : row + 1].to(model.device)
            mask = attention_mask[row : row + 1].to(model.device)
            with keys_and_values_per_query_head(model.model), serving(row):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = token_nll(logits, ids, mask).sum()
            (loss / predicted).backward()
            total += loss.item()
        optimizer.step()
        memory.clip_()
        losses.append(total / predicted)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses
