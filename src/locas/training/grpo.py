"""GRPO (group-relative policy optimisation) as a test-time training loss of the memory.

For each prompt, `group_size` completions are sampled with the memory on and scored by a reward function;
a completion's advantage is its reward minus its group's mean, divided by the group's standard deviation
(Bessel-corrected, as `torch.std` and TRL's GRPOTrainer) plus `eps`. The loss of one update is

    mean over completions of [ mean over completion tokens of
        -min(ratio * A, clip(ratio, 1 - clip_epsilon, 1 + clip_epsilon) * A) + beta * KL_token ]

with ratio = exp(logp - logp_old), logp_old = the policy's log-probs before the batch's first update
(so ratio is 1 on that update), and KL_token = exp(ref - logp) - (ref - logp) - 1 (the k3 estimator of
DeepSeekMath and TRL, >= 0, unbiased) to the reference: the same network with the memory off, so no
second model is kept. Log-probs are those of the sampling distribution, softmax(logits / temperature).

Normalisation: per-sequence mean over its completion tokens (up to and including the first EOS), then
mean over sequences: TRL's `loss_type="grpo"`, the DeepSeekMath objective. Every completion weighs the
same whatever its length, which suits the recall task (a reward per continuation, lengths nearly equal);
TRL's token-level alternatives (`bnpo`/`dapo`) weigh long completions more.

Only the memory learns: the backbone is frozen by `LocasModel` and never handed to the optimiser.

The recall task (prompts cut from the text being memorised, rewarded by the token F1 of the sampled
continuation against the true one) is what the online trainer's `grpo` / `ntp+grpo` losses run per chunk
(`grpo_train_chunk`) and `locas memorize --loss grpo` runs over a whole text (`grpo_train_text`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from locas.data import window_prefix
from locas.evaluation.token_f1 import token_f1
from locas.model import NO_MEMORY, LocasModel, target_nll
from locas.training.config import GrpoSettings

# reward_fn(completion_ids, answer) -> reward: the sampled tokens before the first EOS (1-D, on the CPU)
# and the prompt's `answer` (whatever grpo_step was given for that prompt, None when nothing was).
RewardFn = Callable[[torch.Tensor, Any], float]

# --- the math --------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(reward - group mean) / (group std + eps) for rewards (num_prompts, group_size); std Bessel-corrected."""
    rewards = rewards.float()
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True) + eps)


def _sequence_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's masked tokens, then over sequences."""
    mask = mask.to(per_token.dtype)
    return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)).mean()


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_epsilon: float,
) -> torch.Tensor:
    """PPO-clip surrogate -min(ratio * A, clip(ratio) * A); logp, old_logp, mask (batch, tokens), A (batch,)."""
    ratio = torch.exp(logp - old_logp)
    advantages = advantages.unsqueeze(1)
    clipped = ratio.clamp(1 - clip_epsilon, 1 + clip_epsilon)
    return _sequence_mean(-torch.min(ratio * advantages, clipped * advantages), mask)


def kl_to_reference(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(policy || reference) per token, exp(ref - logp) - (ref - logp) - 1, averaged as the loss."""
    difference = ref_logp - logp
    return _sequence_mean(torch.exp(difference) - difference - 1, mask)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_epsilon: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(clipped policy loss + beta * KL, the KL), both scalars normalised per sequence then over sequences."""
    kl = kl_to_reference(logp, ref_logp, mask)
    return clipped_policy_loss(logp, old_logp, advantages, mask, clip_epsilon) + beta * kl, kl


# --- one GRPO step ---------------------------------------------------------------------------------


def _left_padded(prompt_ids: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (batch, longest prompt), prompts aligned to the right; padding id 0."""
    if isinstance(prompt_ids, torch.Tensor) and prompt_ids.dim() == 2:
        return prompt_ids, torch.ones_like(prompt_ids)
    prompts = [torch.as_tensor(p).flatten() for p in prompt_ids]
    if not prompts or min(p.numel() for p in prompts) == 0:
        raise ValueError("grpo_step needs at least one prompt, and every prompt at least one token")
    length = max(p.numel() for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - prompt.numel() :] = prompt
        mask[row, length - prompt.numel() :] = 1
    return ids, mask


def _eos_ids(locas_model: LocasModel) -> list[int]:
    eos = locas_model.model.generation_config.eos_token_id
    if eos is None:
        eos = locas_model.model.config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _completion_mask(completions: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 on each completion's tokens up to and including its first EOS, 0 on the padding after it."""
    positions = torch.arange(completions.shape[1], device=completions.device)
    is_eos = torch.isin(completions, torch.tensor(eos_ids, dtype=completions.dtype, device=completions.device))
    first_eos = torch.where(is_eos, positions, completions.shape[1]).min(dim=1, keepdim=True).values
    return (positions <= first_eos).long()


def _completion_log_probs(
    locas_model: LocasModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_length: int,
    temperature: float,
) -> torch.Tensor:
    """log p(completion token | everything before it) under softmax(logits / temperature), (batch, length)."""
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
    logits = locas_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=completion_length + 1,
    ).logits[:, :-1]
    return -target_nll(logits.float() / temperature, input_ids[:, -completion_length:])


@dataclass
class _SampledBatch:
    """A GRPO batch: every prompt's group of sampled completions and their rewards."""

    input_ids: torch.Tensor  # (prompts * group_size, prompt + completion length), left-padded prompts
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor  # (prompts * group_size, completion length): tokens up to the first EOS
    rewards: torch.Tensor  # (prompts, group_size), on the CPU


def _sample(
    locas_model: LocasModel,
    prompt_ids: Sequence[torch.Tensor] | torch.Tensor,
    reward_fn: RewardFn,
    settings: GrpoSettings,
    answers: Sequence[Any] | None,
    seed: int,
) -> _SampledBatch:
    """`group_size` completions per prompt, sampled with the memory on from `seed`, and their rewards."""
    device = locas_model.device
    prompts, prompt_mask = _left_padded(prompt_ids)
    num_prompts, group_size = prompts.shape[0], settings.group_size
    if answers is not None and len(answers) != num_prompts:
        raise ValueError(f"got {len(answers)} answers for {num_prompts} prompts")
    prompts = prompts.repeat_interleave(group_size, dim=0).to(device)  # rows p*G .. p*G+G-1: prompt p's group
    prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0).to(device)
    eos_ids = _eos_ids(locas_model)

    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        generated = locas_model.generate(
            input_ids=prompts,
            attention_mask=prompt_mask,
            do_sample=True,
            temperature=settings.temperature,
            # Sample from softmax(logits / temperature) itself, whatever the model's generation defaults,
            # so that the log-probs of grpo_step are those of the sampling distribution.
            top_k=0,
            top_p=1.0,
            repetition_penalty=1.0,
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=eos_ids[0] if eos_ids else 0,
        )
    completions = generated[:, prompts.shape[1] :]
    completion_mask = _completion_mask(completions, eos_ids)
    completions = completions * completion_mask  # padding after EOS becomes id 0: it may lie outside the vocab

    eos = torch.tensor(eos_ids, dtype=completions.dtype)
    group_answers = [answer for answer in (answers or [None] * num_prompts) for _ in range(group_size)]
    rewards = torch.tensor(
        [
            float(reward_fn(row[(mask > 0) & ~torch.isin(row, eos)], answer))  # the tokens before the first EOS
            for row, mask, answer in zip(completions.cpu(), completion_mask.cpu(), group_answers, strict=True)
        ]
    )
    return _SampledBatch(
        input_ids=torch.cat([prompts, completions], dim=1),
        attention_mask=torch.cat([prompt_mask, torch.ones_like(completions)], dim=1),
        completion_mask=completion_mask,
        rewards=rewards.view(num_prompts, group_size),
    )


def grpo_step(
    locas_model: LocasModel,
    optimizer: torch.optim.Optimizer,
    prompt_ids: Sequence[torch.Tensor] | torch.Tensor,
    reward_fn: RewardFn,
    settings: GrpoSettings,
    after_step: Callable[[], Any] | None = None,
    answers: Sequence[Any] | None = None,
    seed: int | None = None,
) -> dict[str, float]:
    """Sample, score and train the attached memory for `settings.updates_per_batch` optimiser steps.

    prompt_ids: a list of 1-D prompts (any lengths; left-padded here) or a (batch, length) tensor of
    prompts without padding. Each prompt gets `group_size` completions sampled with the memory on,
    from `seed` (default `settings.seed`) without touching the caller's random state; completion i of
    prompt p is rewarded `reward_fn(tokens before its first EOS, answers[p])`. `after_step` (e.g.
    `memory.clip_`) runs after every optimiser step. The memory must have batch size 1.

    Returns the mean reward of the sampled completions, and the loss and KL of the first update
    (computed before any change to the memory, like the online trainer's first-step loss).
    """
    memory = locas_model.memory
    if memory is None or memory.batch_size != 1:
        raise ValueError("grpo_step trains an attached memory of batch size 1 (one memory for all prompts)")
    batch = _sample(locas_model, prompt_ids, reward_fn, settings, answers, settings.seed if seed is None else seed)
    advantages = group_advantages(batch.rewards).flatten().to(locas_model.device)
    length = batch.completion_mask.shape[1]
    with torch.no_grad(), locas_model.using(None):
        ref_logp = _completion_log_probs(
            locas_model, batch.input_ids, batch.attention_mask, length, settings.temperature
        )

    for update in range(settings.updates_per_batch):
        logp = _completion_log_probs(locas_model, batch.input_ids, batch.attention_mask, length, settings.temperature)
        if update == 0:
            old_logp = logp.detach()  # the policy that sampled: the ratio is exactly 1 on the first update
        loss, kl = grpo_loss(
            logp, old_logp, ref_logp, advantages, batch.completion_mask, settings.clip_epsilon, settings.beta
        )
        if update == 0:
            first_loss, first_kl = loss.item(), kl.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
    return {"reward": batch.rewards.mean().item(), "loss": first_loss, "kl": first_kl}


# --- the recall task -------------------------------------------------------------------------------


def recall_prompts(
    token_ids: torch.Tensor, prompt_tokens: int, continuation_tokens: int, count: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to `count` (prompt, true continuation) pairs cut from the 1-D stream `token_ids`.

    Each pair is `token_ids[s : s + prompt_tokens]` and the `continuation_tokens` that follow, for
    distinct start positions s drawn at random (seeded), in stream order. A stream too short for one
    pair gives an empty list; one with fewer than `count` possible starts gives them all.
    """
    token_ids = token_ids.flatten()
    span = prompt_tokens + continuation_tokens
    starts_available = token_ids.numel() - span + 1
    if starts_available <= 0 or count <= 0:
        return []
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randperm(starts_available, generator=generator)[:count].sort().values.tolist()
    return [(token_ids[s : s + prompt_tokens], token_ids[s + prompt_tokens : s + span]) for s in starts]


def recall_reward(tokenizer) -> RewardFn:
    """A reward fn: token F1 (the LoCoMo metric) of the decoded completion against the decoded true
    continuation, which grpo_step passes as the prompt's answer (token ids)."""

    def reward(completion_ids: torch.Tensor, continuation_ids: torch.Tensor) -> float:
        prediction = tokenizer.decode(completion_ids.tolist(), skip_special_tokens=True)
        truth = tokenizer.decode(torch.as_tensor(continuation_ids).tolist(), skip_special_tokens=True)
        return token_f1(prediction, truth)

    return reward


def _recall_batch(
    chunk_ids: torch.Tensor, settings: GrpoSettings, chunk_index: int, tokenizer
) -> tuple[torch.Tensor, list[torch.Tensor], int] | None:
    """(prompts, true continuations, seed) of the recall task on a chunk; None when it is too short. Each
    prompt starts with the tokenizer's window prefix (bos for Gemma), as the trainer's windows do."""
    seed = settings.seed + chunk_index
    pairs = recall_prompts(
        chunk_ids, settings.prompt_tokens, settings.continuation_tokens, settings.prompts_per_chunk, seed
    )
    if not pairs:
        return None
    prefix = torch.tensor(window_prefix(tokenizer), dtype=chunk_ids.dtype)
    prompts = torch.stack([torch.cat([prefix, prompt.cpu()]) for prompt, _ in pairs])
    return prompts, [continuation for _, continuation in pairs], seed


def grpo_train_chunk(
    locas_model: LocasModel,
    optimizer: torch.optim.Optimizer,
    chunk_ids: torch.Tensor,
    tokenizer,
    settings: GrpoSettings,
    after_step: Callable[[], Any] | None = None,
    chunk_index: int = 0,
) -> dict[str, float | None]:
    """GRPO on the recall task for one chunk of a stream: one `grpo_step` over `prompts_per_chunk` pairs.

    Prompts of `prompt_tokens` tokens are cut from `chunk_ids` (1-D) and each completion is rewarded by
    the token F1 of its text against the true next `continuation_tokens` tokens. `chunk_index` varies the
    seed (prompts and sampling) from chunk to chunk. A chunk shorter than prompt + continuation is not
    trained on: every value is then None. The caller scores the chunk before this (score-first).
    """
    batch = _recall_batch(chunk_ids, settings, chunk_index, tokenizer)
    if batch is None:
        return {"reward": None, "loss": None, "kl": None}
    prompts, continuations, seed = batch
    return grpo_step(
        locas_model,
        optimizer,
        prompts,
        recall_reward(tokenizer),
        settings,
        after_step,
        answers=continuations,
        seed=seed,
    )


def mean_recall_reward(
    locas_model: LocasModel, chunk_ids: torch.Tensor, tokenizer, settings: GrpoSettings, chunk_index: int = 0
) -> float | None:
    """The mean reward of the completions `grpo_train_chunk` would sample for this chunk and index (the
    same prompts and seed), without training; None for a chunk too short for one prompt."""
    batch = _recall_batch(chunk_ids, settings, chunk_index, tokenizer)
    if batch is None:
        return None
    prompts, continuations, seed = batch
    return _sample(locas_model, prompts, recall_reward(tokenizer), settings, continuations, seed).rewards.mean().item()


def grpo_train_text(
    locas_model: LocasModel,
    token_ids: torch.Tensor,
    tokenizer,
    settings: GrpoSettings,
    steps: int,
    lr: float = 4e-3,
    progress: bool = True,
) -> list[dict[str, float | None]]:
    """`steps` AdamW steps of GRPO on the recall task over a whole text (what `locas memorize --loss grpo`
    runs): step s is `grpo_train_chunk` on all of `token_ids` with chunk index s (fresh prompts and
    samples each step), clipping the memory after every update. Returns each step's statistics.
    ValueError when the text is too short for one prompt and its continuation."""
    needed = settings.prompt_tokens + settings.continuation_tokens
    if token_ids.numel() < needed:
        raise ValueError(
            f"the text has {token_ids.numel()} tokens, fewer than one recall prompt and its continuation "
            f"({settings.prompt_tokens} + {settings.continuation_tokens}); use shorter prompts or a longer text"
        )
    memory = locas_model.memory
    if memory is None:
        raise ValueError(NO_MEMORY)
    optimizer = torch.optim.AdamW(memory.parameters(), lr=lr, weight_decay=0.0)
    stats = []
    bar = tqdm(range(steps), desc="GRPO on the memory", unit="step", disable=not progress)
    for step in bar:
        stats.append(grpo_train_chunk(locas_model, optimizer, token_ids, tokenizer, settings, memory.clip_, step))
        bar.set_postfix(reward=f"{stats[-1]['reward']:.3f}")
    return stats
