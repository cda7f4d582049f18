"""Test-time training losses. A loss is a function of a `LossInputs` returning each row's loss, shape (batch,).

`LossInputs.student_logits` are the trainable model's predictions for the chunk's target tokens, one row per
document; `mask` says which targets count (a shorter document's row is padded). A row's loss is the mean over
its own targets, so the sum over rows gives each document the gradient it has alone. The frozen teacher's
predictions (the backbone without memory or adapter, seeing a longer context) are computed only when a loss
asks for them. The per-token NLL is computed once and shared: the trainer reads the chunk's score from it.
Registering a new loss = one function in `LOSSES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class LossInputs:
    student_logits: torch.Tensor  # (batch, n, vocab): predictions of the n target tokens
    targets: torch.Tensor  # (batch, n)
    teacher: Callable[[], torch.Tensor] | None = None  # () -> (batch, n, vocab) teacher logits, no grad
    options: dict[str, Any] = field(default_factory=dict)
    mask: torch.Tensor | None = None  # (batch, n) bool: the targets that count; None: all
    _token_nll: torch.Tensor | None = field(default=None, init=False, repr=False)

    def teacher_logits(self) -> torch.Tensor:
        if self.teacher is None:
            raise ValueError("this loss needs a teacher, but none was provided")
        return self.teacher()

    def token_nll(self) -> torch.Tensor:
        """-log p(target) per target token, (batch, n) in float32; computed once (with grad when the logits
        have it), one row at a time so that only one row's logits are ever copied to float32."""
        if self._token_nll is None:
            logits = self.student_logits
            # A batch of one is flattened rather than indexed: the backward of an index fills a zero tensor
            # of the logits' size before copying the gradient in.
            rows = [logits.flatten(0, 1)] if logits.shape[0] == 1 else logits.unbind(0)
            self._token_nll = torch.stack(
                [
                    F.cross_entropy(row.float(), target, reduction="none")
                    for row, target in zip(rows, self.targets, strict=True)
                ]
            )
        return self._token_nll

    def row_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of (batch, n) `values` over each row's counted targets, (batch,)."""
        return values.sum(dim=1) if self.mask is None else (values * self.mask).sum(dim=1)

    def row_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of (batch, n) `values` over each row's counted targets, (batch,)."""
        counts = values.shape[1] if self.mask is None else self.mask.sum(dim=1).clamp_min(1)
        return self.row_sum(values) / counts


def ntp(inputs: LossInputs) -> torch.Tensor:
    """Next-token cross-entropy, mean over each row's targets."""
    return inputs.row_mean(inputs.token_nll())


def sd(inputs: LossInputs) -> torch.Tensor:
    """Self-distillation: KL(teacher || student) per target token, mean over each row's targets."""
    student = F.log_softmax(inputs.student_logits.float(), dim=-1)
    teacher = F.log_softmax(inputs.teacher_logits().float(), dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(dim=-1)
    return inputs.row_mean(kl)


def mix(inputs: LossInputs) -> torch.Tensor:
    """`mix_alpha` * NTP + (1 - `mix_alpha`) * SD."""
    alpha = inputs.options.get("mix_alpha", 0.5)
    return alpha * ntp(inputs) + (1 - alpha) * sd(inputs)


LOSSES: dict[str, Callable[[LossInputs], torch.Tensor]] = {"ntp": ntp, "sd": sd, "mix": mix}
NEEDS_TEACHER = {"sd", "mix"}
