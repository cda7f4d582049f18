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
from torch.autograd.function import once_differentiable

from locas.model import target_nll


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
        """-log p(target) per target token, (batch, n) in float32; computed once (with grad when the logits have it
        and grad is on: a value first computed without grad is computed again for a loss), one row at a time, so
        that no (batch, n, vocab) float32 copy is made at once."""
        cached = self._token_nll
        wants_grad = torch.is_grad_enabled() and self.student_logits.requires_grad
        if cached is None or (wants_grad and not cached.requires_grad):
            self._token_nll = torch.stack(
                [target_nll(row, target) for row, target in zip(_rows(self.student_logits), self.targets, strict=True)]
            )
        return self._token_nll

    def token_nll_and_kl(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(`token_nll()`, KL(teacher || student) per target token), (batch, n) each in float32, from one
        log-softmax of the student's logits (`nll_and_distillation_kl`); the NLL becomes `token_nll()`'s."""
        rows = zip(_rows(self.student_logits), self.targets, _rows(self.teacher_logits()), strict=True)
        pairs = [nll_and_distillation_kl(student, target, teacher) for student, target, teacher in rows]
        self._token_nll = torch.stack([nll for nll, _ in pairs])
        return self._token_nll, torch.stack([kl for _, kl in pairs])

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
    return inputs.row_mean(inputs.token_nll_and_kl()[1])


def nll_and_distillation_kl(
    student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(-log softmax(student)[target], KL(softmax(teacher) || softmax(student))) over the last axis, in float32,
    differentiable in the student's logits only: `target_nll` and `F.kl_div` of the two log-softmaxes
    (`log_target=True`) summed over the vocabulary, from one log-softmax of the student's logits. Two
    logits-sized float32 buffers are kept for the backward (the student's log-probabilities, the teacher's
    probabilities), which writes one gradient for both terms over the first; the NLL and the KL apart kept three
    and wrote two, and `F.kl_div` alone peaked at five."""
    return _NLLAndDistillationKL.apply(student_logits, targets, teacher_logits)


class _NLLAndDistillationKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor):
        student_log_probs = torch.log_softmax(student_logits, dim=-1, dtype=torch.float32)
        nll = -student_log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        scratch = torch.log_softmax(teacher_logits, dim=-1, dtype=torch.float32)
        teacher_probs = scratch.exp()
        kl = scratch.sub_(student_log_probs).mul_(teacher_probs).sum(-1)  # sum p_t (log p_t - log p_s)
        ctx.save_for_backward(student_log_probs, targets, teacher_probs)
        ctx.logits_dtype = student_logits.dtype
        return nll, kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_nll: torch.Tensor, grad_kl: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        student_log_probs, targets, teacher_probs = ctx.saved_tensors
        # g_nll (p_s - one_hot(target)) + g_kl (p_s - p_t), written over the saved buffers.
        grad = student_log_probs.exp_().mul_((grad_nll + grad_kl).unsqueeze(-1))
        grad.sub_(teacher_probs.mul_(grad_kl.unsqueeze(-1)))
        grad.scatter_add_(-1, targets.unsqueeze(-1), -grad_nll.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None


def mix(inputs: LossInputs) -> torch.Tensor:
    """`mix_alpha` * NTP + (1 - `mix_alpha`) * SD, from one log-softmax of the student's logits."""
    alpha = inputs.options.get("mix_alpha", 0.5)
    nll, kl = inputs.token_nll_and_kl()
    return alpha * inputs.row_mean(nll) + (1 - alpha) * inputs.row_mean(kl)


def _rows(logits: torch.Tensor) -> list[torch.Tensor]:
    """The (n, vocab) rows of (batch, n, vocab) `logits`; a batch of one is flattened rather than indexed (the
    backward of an index fills a zero tensor of the logits' size before copying the gradient in)."""
    return [logits.flatten(0, 1)] if logits.shape[0] == 1 else list(logits.unbind(0))


LOSSES: dict[str, Callable[[LossInputs], torch.Tensor]] = {"ntp": ntp, "sd": sd, "mix": mix}
NEEDS_TEACHER = {"sd", "mix"}
