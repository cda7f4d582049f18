"""Forgetting: what memorising a book costs the model elsewhere (method.md, "MMLU forgetting").

`evaluate_forgetting` trains a Locas memory or a TempLoRA adapter over a book with `run_online` (score-first,
any trainer setting), then measures the model with it and without it (`measure`): MMLU accuracy
(`locas.evaluation.mmlu`) and the perplexity of probe texts the memory never saw, each probe's first tokens
cut into non-overlapping windows scored on their own. The changes (adapted - base) come with a 95% interval
from a seeded paired bootstrap (`paired_bootstrap`): over questions for MMLU accuracy (all questions pooled,
the micro average), over probe windows for perplexity (pooled, and per probe). With no MMLU subjects only the
probe perplexity is measured (a quick check): the results then hold no "mmlu" key and no MMLU changes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from locas.data import window_prefix
from locas.evaluation.mmlu import Subject, score_mmlu
from locas.evaluation.pg19 import Book
from locas.model import token_nll
from locas.training.config import OnlineConfig
from locas.training.online import run_online, trained

BOOTSTRAP_BATCH = 10_000_000  # resampled indices held in memory at once


def mean_over_pairs(rows: np.ndarray) -> np.ndarray:
    """The mean over the pairs axis (1) of resampled rows (resamples, pairs)."""
    return rows.mean(axis=1)


def pooled_perplexity(rows: np.ndarray) -> np.ndarray:
    """exp(NLL sum / tokens) of resampled (resamples, pairs, 2) rows of (NLL sum, tokens)."""
    return np.exp(rows[..., 0].sum(axis=1) / rows[..., 1].sum(axis=1))


def paired_bootstrap(
    before: Sequence | np.ndarray,
    after: Sequence | np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray] = mean_over_pairs,
    *,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """The change `statistic(after) - statistic(before)` and its percentile bootstrap interval.

    `before[i]` and `after[i]` are one pair (the same question or text window, without and with the memory);
    a row may be a number or a vector (e.g. NLL sum and tokens). Each resample draws pairs with replacement
    and keeps them paired. `statistic` maps resampled rows, shape (resamples, pairs, ...), to (resamples,).
    """
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if before.shape != after.shape or len(before) == 0:
        raise ValueError(f"paired_bootstrap needs two equally long, non-empty lists; got {before.shape}, {after.shape}")
    rng = np.random.default_rng(seed)
    pairs = len(before)
    per_batch = max(1, BOOTSTRAP_BATCH // pairs)
    deltas = []
    for start in range(0, resamples, per_batch):
        index = rng.integers(0, pairs, size=(min(per_batch, resamples - start), pairs))
        deltas.append(statistic(after[index]) - statistic(before[index]))
    low, high = np.quantile(np.concatenate(deltas), [(1 - confidence) / 2, (1 + confidence) / 2])
    value_before, value_after = statistic(before[None])[0], statistic(after[None])[0]
    return {
        "before": float(value_before),
        "after": float(value_after),
        "delta": float(value_after - value_before),
        "low": float(low),
        "high": float(high),
        "confidence": confidence,
        "resamples": resamples,
        "seed": seed,
    }


# --- measuring -------------------------------------------------------------------------------------


@torch.no_grad()
def probe_perplexity(
    model,
    probes: Sequence[Book],
    window: int,
    *,
    prefix: Sequence[int] = (),
    progress: bool = True,
    description: str = "",
) -> dict:
    """Each probe's tokens cut into windows of `window` tokens (a last piece under 2 tokens is dropped), each
    scored on its own after `prefix` (`data.window_prefix`: bos for Gemma): per window NLL sum and tokens
    (the prefix and the window's first token are never scored), per probe and pooled perplexity."""
    pieces = [(probe.name, piece) for probe in probes for piece in probe.token_ids.split(window) if piece.numel() >= 2]
    windows = []
    for name, piece in tqdm(pieces, desc=description, unit="window", disable=not progress):
        ids = torch.cat([torch.tensor(list(prefix), dtype=piece.dtype), piece]).unsqueeze(0).to(model.device)
        nll_sum = token_nll(model(input_ids=ids, use_cache=False).logits, ids)[:, len(prefix) :].sum().item()
        windows.append({"probe": name, "nll_sum": nll_sum, "tokens": piece.numel() - 1})

    def pooled(rows: list[dict]) -> dict:
        nll_sum, tokens = sum(row["nll_sum"] for row in rows), sum(row["tokens"] for row in rows)
        return {"windows": len(rows), "tokens": tokens, "nll_sum": nll_sum, "ppl": math.exp(nll_sum / tokens)}

    return {
        "window": window,
        **pooled(windows),
        "probes": {probe.name: pooled([row for row in windows if row["probe"] == probe.name]) for probe in probes},
        "records": windows,
    }


def measure(
    model,
    tokenizer: PreTrainedTokenizerBase,
    subjects: Sequence[Subject],
    probes: Sequence[Book],
    *,
    probe_window: int = 1024,
    progress: bool = True,
    label: str = "base",
) -> dict:
    """MMLU (`score_mmlu`, under "mmlu") and probe perplexity (`probe_perplexity`) of `model` as it is; no
    `subjects` (empty): the probe perplexity only, no "mmlu" key."""
    measured: dict = {}
    if subjects:
        measured["mmlu"] = score_mmlu(model, tokenizer, subjects, progress=progress, description=f"MMLU {label}")
    measured["perplexity"] = probe_perplexity(
        model,
        probes,
        probe_window,
        prefix=window_prefix(tokenizer),
        progress=progress,
        description=f"probes {label}",
    )
    return measured


def compare(base: dict, adapted: dict, *, resamples: int = 10_000, seed: int = 0) -> dict:
    """Paired-bootstrap changes from `base` to `adapted` (two `measure` results on the same questions and probes):
    MMLU micro accuracy (over questions), pooled and per-probe perplexity (over windows), and the macro
    accuracy's change (no interval); without MMLU results (measured with no subjects), perplexity only."""
    options = {"resamples": resamples, "seed": seed}

    def correct(measured: dict) -> list[float]:
        return [float(record["correct"]) for record in measured["mmlu"]["records"]]

    def windows(measured: dict, probe: str | None = None) -> list[tuple[float, int]]:
        records = measured["perplexity"]["records"]
        return [(row["nll_sum"], row["tokens"]) for row in records if probe in (None, row["probe"])]

    if ("mmlu" in base) != ("mmlu" in adapted):
        raise ValueError("only one of the base and adapted results holds MMLU; measure both with the same subjects")
    deltas = {}
    if "mmlu" in base:
        base_questions = [(r["subject"], r["index"]) for r in base["mmlu"]["records"]]
        if base_questions != [(r["subject"], r["index"]) for r in adapted["mmlu"]["records"]]:
            raise ValueError("the base and adapted MMLU results hold other questions; measure both on the same subset")
        deltas["mmlu_micro_accuracy"] = paired_bootstrap(correct(base), correct(adapted), **options)
        deltas["mmlu_macro_accuracy"] = adapted["mmlu"]["macro_accuracy"] - base["mmlu"]["macro_accuracy"]
    return {
        **deltas,
        "ppl": paired_bootstrap(windows(base), windows(adapted), pooled_perplexity, **options),
        "ppl_per_probe": {
            name: paired_bootstrap(windows(base, name), windows(adapted, name), pooled_perplexity, **options)
            for name in base["perplexity"]["probes"]
        },
    }


def evaluate_forgetting(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    book: Book,
    config: OnlineConfig,
    subjects: Sequence[Subject],
    probes: Sequence[Book],
    *,
    probe_window: int = 1024,
    base: dict | None = None,
    state_path: str | Path | None = None,
    save_every: int = 8,
    resamples: int = 10_000,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train `config.method` (locas or lora) online over `book`, then measure the model with the memory or
    adapter on and compare with the model without it (`base`: an earlier `measure` of the same model, subjects
    and probes; measured here when None); no `subjects` (empty): the probe perplexity only, no MMLU. With
    `state_path` the training resumes from, and is saved to, that file (see `run_online`): a finished training
    there is loaded instead of run again."""
    config = config.resolved()
    if config.method not in ("locas", "lora"):
        raise ValueError(f"forgetting compares a trained memory or adapter with the model; method {config.method!r}")
    options = {"probe_window": probe_window, "progress": progress}
    result = run_online(  # first: a saved training of other settings is refused before any measurement
        model,
        book.token_ids,
        config,
        state_path=state_path,
        save_every=save_every,
        progress=progress,
        description=f"{book.name} {config.method}",
        tokenizer=tokenizer,
    )
    if base is None:  # the model is bare again after the training
        base = measure(model, tokenizer, subjects, probes, **options, label="base")
    with trained(model, result):  # the memory's hooks (adapter's layers) sit inside `model` for the block
        adapted = measure(model, tokenizer, subjects, probes, **options, label=config.method)
    return {
        "book": {"name": book.name, "path": str(book.path), "tokens": book.token_ids.numel()},
        "config": dataclasses.asdict(result.config),
        "training": {
            "tokens_scored": result.tokens,
            "online_ppl": math.exp(result.nll),
            "trainable_parameters": result.trainable_parameters,
            "seconds": result.seconds,
        },
        "deltas": compare(base, adapted, resamples=resamples, seed=seed),
        "base": base,
        "adapted": adapted,
    }


def format_summary(results: dict) -> str:
    """The changes with their intervals, one line each (the MMLU lines only where MMLU was measured)."""
    deltas = results["deltas"]

    def line(name: str, change: dict, scale: float = 1.0, unit: str = "") -> str:
        return (
            f"{name:<28} {change['before'] * scale:>9.3f} -> {change['after'] * scale:>9.3f}  "
            f"delta {change['delta'] * scale:+.3f}{unit} [{change['low'] * scale:+.3f}, {change['high'] * scale:+.3f}]"
        )

    lines = [
        f"{results['config']['method']} on {results['book']['name']} ({results['training']['tokens_scored']} tokens, "
        f"online PPL {results['training']['online_ppl']:.3f}); base -> adapted, 95% paired-bootstrap interval",
    ]
    mmlu = results["adapted"].get("mmlu")
    if mmlu is not None:
        lines += [
            line(f"MMLU accuracy ({mmlu['questions']} q.)", deltas["mmlu_micro_accuracy"], 100, " points"),
            f"{'MMLU macro accuracy':<28} delta {deltas['mmlu_macro_accuracy'] * 100:+.3f} points (no interval)",
        ]
    lines.append(line("probe PPL (pooled)", deltas["ppl"]))
    lines += [line(f"probe PPL {name}", change) for name, change in deltas["ppl_per_probe"].items()]
    return "\n".join(lines)
