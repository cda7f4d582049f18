"""PG-19 whole-book language modelling: every method reads every book online, score-first (method.md, 5).

Each (method, book) pair is one online run over the book's first `max_tokens` tokens: every chunk is
scored with the model as it was before training on that chunk (several books may run in one batch, each
with its own memory and the numbers of its own run). The pairs' state lives in a folder next to the
results file (`results.json` -> `results.state/`): `BOOKS.METHOD.pt` (the trainer's resumable state)
while a batch runs, `BOOK.METHOD.json` (its metrics) once it finished, so an interrupted evaluation
started again resumes where it was saved and does not run finished pairs again.

A method is named `none`, `long`, `lora` or `locas`, or `locas:INIT` for a memory with that init
(e.g. `locas:random_index`); the name is the method's label in the results.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import resource
import shutil
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from locas.data import first_tokens, read_text
from locas.evaluation.distributed import SINGLE_PROCESS, Ranks
from locas.training.config import OnlineConfig, same_settings, settings_changes
from locas.training.online import OnlineResult, run_online_batch

MARKS = (50_000, 100_000, 150_000, 200_000)  # tokens read: the paper's PPL@50K ... PPL@200K
PERCENTS = tuple(range(10, 101, 10))  # of the tokens read: the curve's deciles


# --- inputs ----------------------------------------------------------------------------------------


def method_configs(labels: Sequence[str], base: OnlineConfig) -> dict[str, OnlineConfig]:
    """The resolved config of each method label (`base` with the label's method, and init for `locas:INIT`).

    ValueError for an unknown method or init, an init on another method, a label given twice, or any
    setting the trainer refuses (e.g. a chunk larger than the context window).
    """
    configs = {}
    for label in labels:
        method, has_init, init = label.partition(":")
        if has_init and method != "locas":
            raise ValueError(f"method {label!r}: only locas takes an init, as in locas:random_index")
        if label in configs:
            raise ValueError(f"method {label!r} is given twice")
        overrides = {"memory_init": init} if has_init else {}
        configs[label] = dataclasses.replace(base, method=method, **overrides).resolved()
    return configs


@dataclass
class Book:
    name: str  # the file's stem: the book's key in the results and in state file names
    path: Path
    token_ids: torch.Tensor  # 1-D, the first max_tokens tokens of the text


def check_book_files(paths: Sequence[str | Path]) -> None:
    """Refuse, before any model is loaded, a missing, empty or non-UTF-8 book, or two books of the same name."""
    names: dict[str, Path] = {}
    for path in map(Path, paths):
        read_text(path)
        if path.stem in names and names[path.stem].resolve() == path.resolve():
            raise ValueError(f"{str(path)!r} is given twice; pass each book once")
        if path.stem in names:
            raise ValueError(f"books {str(names[path.stem])!r} and {str(path)!r} have the same name; rename one")
        names[path.stem] = path


def read_book(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, max_tokens: int | None = None, chunk_size: int = 1
) -> Book:
    """The book's first `max_tokens` tokens (no special tokens); ValueError when they make less than one chunk."""
    path = Path(path)
    token_ids = first_tokens(tokenizer, read_text(path), max_tokens)
    if len(token_ids) < chunk_size:
        count = f"{len(token_ids)} token{'s' * (len(token_ids) != 1)}"
        raise ValueError(f"book {str(path)!r} has {count}, fewer than one chunk of {chunk_size}")
    return Book(path.stem, path, torch.tensor(token_ids, dtype=torch.long))


# --- metrics ---------------------------------------------------------------------------------------


def book_metrics(result: OnlineResult, token_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Perplexities, bits per byte, time and size of one online run over `token_ids`.

    Cumulative PPL is exp(NLL sum / tokens scored) at the end of a chunk; a mark (50K tokens, 30% of the
    run, ...) takes the first chunk ending at or past it and records the token counts it used.
    `templora_ppl_convention` is TempLoRA's number: the token-weighted mean of per-chunk exp(mean NLL).
    """
    records = result.records
    scored = list(itertools.accumulate(r.targets for r in records))
    nll_sums = list(itertools.accumulate(r.nll_sum for r in records))
    tokens_read = records[-1].end

    def at(mark: int) -> dict:
        i = next(i for i, r in enumerate(records) if r.end >= mark)
        return {
            "tokens_read": records[i].end,
            "tokens": scored[i],
            "nll_sum": nll_sums[i],
            "ppl": _ppl(nll_sums[i], scored[i]),
        }

    scored_bytes = sum(len(tokenizer.decode(token_ids[max(r.start, 1) : r.end]).encode("utf-8")) for r in records)
    return {
        "tokens": scored[-1],
        "bytes": scored_bytes,
        "nll_sum": nll_sums[-1],
        "ppl": _ppl(nll_sums[-1], scored[-1]),
        "bits_per_byte": nll_sums[-1] / math.log(2) / scored_bytes,
        "templora_ppl_convention": sum(r.targets * math.exp(r.nll_sum / r.targets) for r in records) / scored[-1],
        "ppl_at_marks": [{"mark": mark, **at(mark)} for mark in MARKS if mark <= tokens_read],
        "ppl_at_percent": [{"percent": p, **at(-(-tokens_read * p // 100))} for p in PERCENTS],
        "curve": {"tokens_read": [r.end for r in records], "ppl": list(map(_ppl, nll_sums, scored))},
        "seconds": result.seconds,
        "trainable_parameters": result.trainable_parameters,
    }


def aggregate(rows: Sequence[dict]) -> dict[str, dict]:
    """Per method label, over its books: token-weighted and mean per-book PPL, PPL at the marks every book
    reached, bits per byte, seconds (and their ratio to the `none` method's when it ran too), peak memory."""
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    summary = {}
    for label, books in by_method.items():
        reached = [mark for mark in MARKS if all(mark <= book["curve"]["tokens_read"][-1] for book in books)]
        nll_sum = sum(book["nll_sum"] for book in books)
        summary[label] = {
            "books": len(books),
            "tokens": sum(book["tokens"] for book in books),
            "nll_sum": nll_sum,
            "ppl": _pooled_ppl(books),
            "mean_book_ppl": statistics.fmean(book["ppl"] for book in books),
            "ppl_at_marks": [
                {"mark": mark, "ppl": _pooled_ppl(_at_mark(book, mark) for book in books)} for mark in reached
            ],
            "bits_per_byte": nll_sum / math.log(2) / sum(book["bytes"] for book in books),
            "seconds": sum(book["seconds"] for book in books),
            "trainable_parameters": max(book["trainable_parameters"] for book in books),
            "peak_memory": max((book["peak_memory"] for book in books), key=lambda peak: peak["bytes"]),
        }
    if "none" in summary:
        for method in summary.values():
            method["seconds_vs_none"] = method["seconds"] / summary["none"]["seconds"]
    return summary


def _ppl(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens)


def _pooled_ppl(parts: Iterable[dict]) -> float:
    """exp(total NLL / total tokens) over parts (books, marks) that carry `nll_sum` and `tokens`."""
    parts = list(parts)
    return _ppl(sum(part["nll_sum"] for part in parts), sum(part["tokens"] for part in parts))


def _at_mark(row: dict, mark: int) -> dict:
    return next(point for point in row["ppl_at_marks"] if point["mark"] == mark)


def peak_memory(device: torch.device) -> dict:
    """The peak memory of this pair on CUDA (`torch.cuda.max_memory_allocated`, reset before each pair),
    else of this process so far (peak resident set size)."""
    if device.type == "cuda":
        return {"kind": "cuda_max_memory_allocated", "bytes": torch.cuda.max_memory_allocated(device)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return {"kind": "process_peak_rss", "bytes": peak * (1 if sys.platform == "darwin" else 1024)}


# --- running the pairs -----------------------------------------------------------------------------


def state_folder(out: str | Path) -> Path:
    """Where the pairs of the evaluation written to `out` keep their state: `results.json` -> `results.state`."""
    return Path(out).with_suffix(".state")


def open_state_folder(folder: Path, settings: dict) -> None:
    """Create `folder`, or check that the run saved in it used the same `settings` (model, max_tokens, ...)."""
    saved = folder / "settings.json"
    if saved.exists():
        previous = json.loads(saved.read_text(encoding="utf-8"))
        if _same_folder(previous.get("model"), settings.get("model")):  # "tiny" and "/abs/tiny" are one model
            previous["model"] = settings["model"]
        if previous != settings:
            changed = ", ".join(
                f"{key} {previous.get(key)} -> {settings.get(key)}"
                for key in settings | previous
                if previous.get(key) != settings.get(key)
            )
            raise ValueError(
                f"{folder} holds a run with other settings ({changed}); delete it or choose another output"
            )
        return
    folder.mkdir(exist_ok=True)
    write_json(settings, saved)


def _same_folder(first: str | None, second: str | None) -> bool:
    paths = [Path(name) for name in (first, second) if name is not None]
    return len(paths) == 2 and all(path.exists() for path in paths) and paths[0].samefile(paths[1])


def _row_path(folder: Path, book: Book, label: str) -> Path:
    return folder / f"{book.name}.{label.replace(':', '-')}.json"


def finished_row(folder: Path, book: Book, label: str, config: OnlineConfig) -> dict | None:
    """The saved metrics of a finished (book, method) pair, None if it has not finished; ValueError when it ran
    with other settings than `config`."""
    path = _row_path(folder, book, label)
    if not path.exists():
        return None
    row = json.loads(path.read_text(encoding="utf-8"))
    if not same_settings(row["config"], config):
        raise ValueError(
            f"the finished run in {path} used other settings ({settings_changes(row['config'], config)}); "
            "delete it or choose another output"
        )
    return row


def run_books(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    books: Sequence[Book],
    label: str,
    config: OnlineConfig,
    folder: Path,
    *,
    save_every: int = 8,
    progress: bool = True,
    rank: int = 0,
) -> list[dict]:
    """The metrics of `label` on each of `books`: read from `folder` for finished pairs; the others run
    together in one batch (`run_online_batch`, resuming their saved state)."""
    rows = {}
    for book in books:
        row = finished_row(folder, book, label, config)
        if row is not None:
            rows[book.name] = row
            if progress:
                tqdm.write(
                    f"{book.name} {label}: finished earlier, read from {_row_path(folder, book, label)}", sys.stderr
                )
    pending = [book for book in books if book.name not in rows]
    if pending:
        if model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(model.device)
        names = "+".join(book.name for book in pending)
        state = folder / f"{names}.{label.replace(':', '-')}.pt"
        results = run_online_batch(
            model,
            [book.token_ids for book in pending],
            config,
            state_path=state,
            save_every=save_every,
            progress=progress,
            description=f"{names} {label}",
            tokenizer=tokenizer,
        )
        for book, result in zip(pending, results, strict=True):
            row = {
                "book": book.name,
                "path": str(book.path),
                "method": label,
                **book_metrics(result, book.token_ids, tokenizer),
                "peak_memory": peak_memory(model.device),
                "batch_books": len(pending),
                "rank": rank,
                "config": dataclasses.asdict(result.config),
            }
            write_json(row, _row_path(folder, book, label))
            rows[book.name] = row
        state.unlink(missing_ok=True)  # every pending book's row is written: the training state is not needed
    return [rows[book.name] for book in books]


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    books: Sequence[Book],
    methods: Mapping[str, OnlineConfig],
    out: str | Path,
    settings: dict,
    *,
    save_every: int = 8,
    progress: bool = True,
    ranks: Ranks = SINGLE_PROCESS,
    batch_books: int = 1,
) -> dict | None:
    """Run every method on this rank's share of the books; on rank 0, write and return the results.

    `batch_books` > 1 adapts that many books at once (one forward/backward per chunk for all of them;
    each book's numbers are those of its own run). TempLoRA (`lora`) always runs one book at a time.

    `settings` (model, dtype, max_tokens: what the books' tokens depend on) guard the state folder
    against resuming another run. The results JSON (`out`) holds the settings, each method's resolved
    config, each book's metrics per method and the aggregate per method; the plot goes to `out` .png.
    Other ranks return None and write only their pairs' state.
    """
    folder = state_folder(out)
    new_folder = not folder.exists()
    open_state_folder(folder, settings)
    share = list(ranks.share(books))
    rows = []
    try:
        for label, config in methods.items():  # refuse other settings before anything runs
            for book in share:
                finished_row(folder, book, label, config)
        for label, config in methods.items():
            size = 1 if config.method == "lora" or config.uses_grpo else batch_books
            for first in range(0, len(share), size):
                rows += run_books(
                    model,
                    tokenizer,
                    share[first : first + size],
                    label,
                    config,
                    folder,
                    save_every=save_every,
                    progress=progress,
                    rank=ranks.rank,
                )
    except BaseException:  # a refusal (or a stop) before anything was saved leaves no state folder behind
        if new_folder and [path.name for path in folder.iterdir()] == ["settings.json"]:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    by_pair = {(row["book"], row["method"]): row for row in ranks.gather(rows)}
    if not ranks.is_main:
        return None
    results = {
        "settings": {**settings, "device": str(model.device), "world_size": ranks.world_size},
        "methods": {label: dataclasses.asdict(config) for label, config in methods.items()},
        "aggregate": aggregate([by_pair[book.name, label] for book in books for label in methods]),
        "books": {book.name: {label: by_pair[book.name, label] for label in methods} for book in books},
    }
    write_json(results, out)
    plot_curves(results, plot_path(out))
    return results


# --- outputs ---------------------------------------------------------------------------------------


def save_figure(figure, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically (a partial file, then a rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        figure.savefig(partial, format="png", dpi=120)
        os.replace(partial, path)
    finally:
        plt.close(figure)
        partial.unlink(missing_ok=True)
    return path


def write_json(value: object, path: str | Path) -> None:
    """Write `value` as JSON atomically: a partial file, then a rename (safe for several writers)."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        partial.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def plot_path(out: str | Path) -> Path:
    """The plot beside the results JSON: `results.json` -> `results.png`."""
    return Path(out).with_suffix(".png")


def plot_curves(results: dict, path: Path) -> None:
    """Cumulative PPL against tokens read, one panel per book, one line per method; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    books = results["books"]
    columns = min(len(books), 3)
    rows = math.ceil(len(books) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for axis, (name, methods) in zip(axes.flat, books.items(), strict=False):
        for label, row in methods.items():
            axis.plot(row["curve"]["tokens_read"], row["curve"]["ppl"], label=f"{label} ({row['ppl']:.2f})")
        axis.set(title=f"book {name}", xlabel="tokens read", ylabel="cumulative perplexity")
        axis.xaxis.set_major_formatter(lambda tokens, _: f"{tokens / 1000:g}K" if tokens >= 1000 else f"{tokens:g}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    for axis in axes.flat[len(books) :]:
        axis.set_visible(False)
    figure.suptitle("PG-19, online score-first: perplexity of the book so far")
    figure.tight_layout()
    save_figure(figure, path)


def format_table(results: dict) -> str:
    """The per-book and per-method tables printed at the end of an evaluation."""
    lines = [
        f"{'book':<12} {'method':<20} {'tokens':>8} {'PPL':>9} {'bits/byte':>9} {'TempLoRA-PPL':>12} "
        f"{'seconds':>9} {'params':>10}"
    ]
    for name, methods in results["books"].items():
        for label, row in methods.items():
            lines.append(
                f"{name:<12} {label:<20} {row['tokens']:>8} {row['ppl']:>9.3f} {row['bits_per_byte']:>9.4f} "
                f"{row['templora_ppl_convention']:>12.3f} {row['seconds']:>9.1f} {row['trainable_parameters']:>10}"
            )
    marks = sorted({m["mark"] for method in results["aggregate"].values() for m in method["ppl_at_marks"]})
    lines += [
        "",
        f"{'all books':<12} {'method':<20} {'tokens':>8} {'PPL':>9} {'bits/byte':>9} {'mean PPL':>12} "
        f"{'seconds':>9} {'x none':>7} {'peak MiB':>9}" + "".join(f" {f'PPL@{m // 1000}K':>9}" for m in marks),
    ]
    for label, method in results["aggregate"].items():
        at_marks = {m["mark"]: m["ppl"] for m in method["ppl_at_marks"]}
        vs_none = f"{method['seconds_vs_none']:>7.2f}" if "seconds_vs_none" in method else f"{'-':>7}"
        lines.append(
            f"{'':<12} {label:<20} {method['tokens']:>8} {method['ppl']:>9.3f} {method['bits_per_byte']:>9.4f} "
            f"{method['mean_book_ppl']:>12.3f} {method['seconds']:>9.1f} {vs_none} "
            f"{method['peak_memory']['bytes'] / 2**20:>9.0f}"
            + "".join(f" {at_marks[m]:>9.3f}" if m in at_marks else f" {'-':>9}" for m in marks)
        )
    lines.append(
        "PPL = exp(NLL sum / tokens), token-weighted; mean PPL = mean over books; TempLoRA-PPL = TempLoRA's convention"
    )
    return "\n".join(lines)
