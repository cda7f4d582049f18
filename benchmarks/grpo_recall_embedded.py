"""GRPO vs NTP on the recall task, on the embedded default model (SmolLM2-135M-Instruct).

A memory of `--width` slots is memorized (`highest`) from the first `--max-tokens` tokens of a PG-19 book,
then trained for `--steps` steps by each objective in turn, from the same start:

    ntp        next-token cross-entropy over the text (`train_on_windows`, as `locas memorize --train-steps`)
    grpo       GRPO on recall prompts cut from the text, reward = token F1 of the sampled continuation
               against the true one (`grpo_train_text`, as `locas memorize --loss grpo`)
    ntp+grpo   the NTP steps, then the GRPO steps

and measured before and after: the mean recall reward on held-out draws (prompts and samples seeded apart
from the training ones: chunk indices from 1000) and the text's NLL. Writes JSON and a bar chart.

    python benchmarks/grpo_recall_embedded.py            # ~5-10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from locas.data import read_text, split_windows
from locas.default_model import load_model
from locas.evaluation.pg19 import save_figure, write_json
from locas.model import LocasModel
from locas.training import train_on_windows
from locas.training.config import GrpoSettings
from locas.training.grpo import grpo_train_text, mean_recall_reward

REPO = Path(__file__).resolve().parents[1]
BOOK = REPO.parent / "shared" / "data" / "pg19" / "349.txt"
OBJECTIVES = ("ntp", "grpo", "ntp+grpo")
HELD_OUT = 1000  # chunk indices of the evaluation draws (training uses 0 .. steps - 1)


def recall_reward(locas_model: LocasModel, token_ids: torch.Tensor, tokenizer, settings, draws: int) -> float:
    rewards = [mean_recall_reward(locas_model, token_ids, tokenizer, settings, HELD_OUT + i) for i in range(draws)]
    return sum(rewards) / len(rewards)


def text_nll(locas_model: LocasModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
    nll = locas_model.compute_nll(input_ids, attention_mask=attention_mask)
    return (nll.sum() / attention_mask[:, 1:].sum()).item()


def run(args: argparse.Namespace) -> dict:
    model, tokenizer = load_model()
    token_ids = tokenizer(read_text(args.book), add_special_tokens=False, return_tensors="pt").input_ids[0]
    token_ids = token_ids[: args.max_tokens]
    input_ids, attention_mask = split_windows(token_ids, args.window, tokenizer.pad_token_id)
    settings = GrpoSettings(prompts_per_chunk=args.prompts, group_size=args.group_size, seed=args.seed)
    locas_model = LocasModel(model)
    start = locas_model.memorize(input_ids, attention_mask=attention_mask, keep_top=args.width, seed=args.seed)
    results = {
        "settings": {**vars(args), "book": str(args.book), "out": str(args.out), "grpo": dataclasses.asdict(settings)},
        "before": {
            "recall_reward": recall_reward(locas_model, token_ids, tokenizer, settings, args.draws),
            "nll": text_nll(locas_model, input_ids, attention_mask),
        },
        "objectives": {},
    }
    print(f"before training: {results['before']}", flush=True)
    for objective in OBJECTIVES:
        locas_model.attach_memory(start.select(0))  # the same memorized start for every objective
        started = time.perf_counter()
        if objective in ("ntp", "ntp+grpo"):
            train_on_windows(locas_model, input_ids, attention_mask, steps=args.steps, lr=args.lr)
        if objective in ("grpo", "ntp+grpo"):
            grpo_train_text(locas_model, token_ids, tokenizer, settings, args.steps, lr=args.lr, progress=False)
        seconds = time.perf_counter() - started
        row = {
            "recall_reward": recall_reward(locas_model, token_ids, tokenizer, settings, args.draws),
            "nll": text_nll(locas_model, input_ids, attention_mask),
            "train_seconds": seconds,
        }
        results["objectives"][objective] = row
        print(f"{objective}: {row}", flush=True)
    locas_model.detach()
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["before", *results["objectives"]]
    rows = [results["before"], *results["objectives"].values()]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for axis, key, title in zip(
        axes, ("recall_reward", "nll"), ("recall reward (token F1)", "text NLL (nats)"), strict=True
    ):
        axis.bar(labels, [row[key] for row in rows], color=["gray", "C0", "C1", "C2"][: len(rows)])
        axis.set_title(title)
    figure.suptitle(f"memory r={results['settings']['width']}, {results['settings']['steps']} steps per objective")
    figure.tight_layout()
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--book", type=Path, default=BOOK)
    parser.add_argument("--max-tokens", type=int, default=1024, help="the text memorized: the book's first N tokens")
    parser.add_argument("--window", type=int, default=1024, help="tokens per NTP window")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="optimiser steps per objective (ntp+grpo: each)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--prompts", type=int, default=8, help="recall prompts per GRPO step")
    parser.add_argument("--group-size", type=int, default=4, help="completions sampled per prompt")
    parser.add_argument("--draws", type=int, default=4, help="held-out reward draws (each: --prompts x --group-size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "grpo_recall_embedded.json")
    args = parser.parse_args(argv)
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(results, args.out)
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main()
