"""Test-time training losses. A loss is a function of a `LossInputs` returning a scalar tensor.

`LossInputs.student_logits` are the trainable model's predictions for the chunk's target tokens; the
frozen teacher's predictions (the backbone without memory or adapter, seeing a longer context) are
computed only when a loss asks for them. Registering a new loss = one function in `LOSSES`.
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

    def teacher_logits(self) -> torch.Tensor:
        if self.teacher is None:
            raise ValueError("this loss needs a teacher, but none was provided")
        return self.teacher()


def ntp(inputs: LossInputs) -> torch.Tensor:
    """Next-token cross-entropy, mean over target tokens."""
    return F.cross_entropy(inputs.student_logits.float().flatten(0, 1), inputs.targets.flatten())


def sd(inputs: LossInputs) -> torch.Tensor:
    """Self-distillation: KL(teacher || student) per target token, mean over tokens."""
    student = F.log_softmax(inputs.student_logits.float(), dim=-1)
    teacher = F.log_softmax(inputs.teacher_logits().float(), dim=-1)
    return F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")


def mix(inputs: LossInputs) -> torch.Tensor:
    """`mix_alpha` * NTP + (1 - `mix_alpha`) * SD."""
    alpha = inputs.options.get("mix_alpha", 0.5)
    return alpha * ntp(inputs) + (1 - alpha) * sd(inputs)


LOSSES: dict[str, Callable[[LossInputs], torch.Tensor]] = {"ntp": ntp, "sd": sd, "mix": mix}
NEEDS_TEACHER = {"sd", "mix"}
