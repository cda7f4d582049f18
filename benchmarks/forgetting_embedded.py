"""Forgetting on the embedded default model (SmolLM2-135M): Locas vs TempLoRA, each with its --preset's settings
(`default`, or `paper`: the paper's Locas r=64 and TempLoRA's published defaults), trained online over one PG-19
book, then MMLU 5-shot and the perplexity of two other books, each with the memory (adapter) and without it, with
95% paired-bootstrap intervals (`locas.evaluation.forgetting`).

Full run (book 349's first 32K tokens, chunk 512 / context 512; 20 questions of every MMLU subject, the same
for every method; probes: the first 4,096 tokens of books 1684 and 17769, windows of 512; estimated at about
2 hours on 2 busy CPU cores, mostly the 3 x 1,140 MMLU questions):

    python benchmarks/forgetting_embedded.py

`--no-mmlu` measures the probe perplexity only (a quick check of minutes; the MMLU folder is not read).

The output folder (default runs/forgetting_embedded/) holds `base.json` (the model without memory),
`METHOD.json` per method, `results.json` (all of it) and `forgetting.png`. Started again, the script skips
what finished (the base measurement, finished methods) and resumes a method's training from `METHOD.state.pt`;
a folder of other settings is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from locas.default_model import load_model
from locas.evaluation import forgetting, mmlu
from locas.evaluation.pg19 import open_state_folder, read_book, save_figure, write_json
from locas.training.config import PRESETS, OnlineConfig, same_settings, settings_changes

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
METHODS = ("locas", "lora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg19", type=Path, default=DATA / "pg19", help="folder of PG-19 books (.txt)")
    parser.add_argument("--mmlu", type=Path, default=DATA / "mmlu", help="MMLU folder (test/, dev/)")
    parser.add_argument("--no-mmlu", action="store_true", help="probe perplexity only: no MMLU loaded or scored")
    parser.add_argument("--preset", default="default", choices=list(PRESETS), help="each method's settings")
    parser.add_argument("--book", default="349", help="the book trained on (file stem)")
    parser.add_argument("--probes", nargs="+", default=["1684", "17769"], help="held-out books (file stems)")
    parser.add_argument("--max-tokens", type=int, default=32_768, help="tokens of the book trained on")
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--context-window", type=int, default=512)
    parser.add_argument("--probe-tokens", type=int, default=4096, help="first N tokens of each probe book")
    parser.add_argument("--probe-window", type=int, default=512, help="tokens per scored probe window")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--limit-per-subject", type=int, default=20, help="the first N questions of each subject")
    parser.add_argument("--subjects", default=None, help="comma-separated (default: all 57)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "forgetting_embedded", help="output folder")
    return parser.parse_args(argv)


def run_method(model, tokenizer, args, method: str, book, subjects, probes, base: dict) -> dict:
    """The method's results: read from OUT/METHOD.json when it finished, else trained (resuming) and measured."""
    config = OnlineConfig(
        method=method, preset=args.preset, chunk_size=args.chunk_size, context_window=args.context_window
    ).resolved()
    finished = args.out / f"{method}.json"
    if finished.exists():
        row = json.loads(finished.read_text(encoding="utf-8"))
        if not same_settings(row["config"], config):
            changes = settings_changes(row["config"], config)
            raise ValueError(f"{finished} was run with other settings ({changes}); delete it or choose another --out")
        return row
    row = forgetting.evaluate_forgetting(
        model,
        tokenizer,
        book,
        config,
        subjects,
        probes,
        probe_window=args.probe_window,
        base=base,
        state_path=args.out / f"{method}.state.pt",
    )
    del row["base"]  # in base.json
    write_json(row, finished)
    return row


def plot(results: dict, path: Path) -> None:
    """MMLU accuracy (when measured) and pooled probe perplexity per model; error bars: the 95% interval of the
    change from base."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    base, methods = results["base"], results["methods"]
    labels = ["base", *methods]
    panels = [("probe perplexity (pooled)", base["perplexity"]["ppl"], "ppl", 1)]
    if "mmlu" in base:
        panels.insert(0, ("MMLU accuracy (%)", 100 * base["mmlu"]["micro_accuracy"], "mmlu_micro_accuracy", 100))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for axis, (title, base_value, key, scale) in zip(axes[0], panels, strict=True):
        changes = [methods[m]["deltas"][key] for m in methods]
        values = [base_value] + [scale * change["after"] for change in changes]
        below = [0] + [scale * (change["delta"] - change["low"]) for change in changes]
        above = [0] + [scale * (change["high"] - change["delta"]) for change in changes]
        ticks = [f"{label}\n{value:.2f}" for label, value in zip(labels, values, strict=True)]
        axis.bar(ticks, values, yerr=[below, above], capsize=4, color=["grey", "tab:blue", "tab:orange"][: len(labels)])
        low = min(v - e for v, e in zip(values, below, strict=True))
        high = max(v + e for v, e in zip(values, above, strict=True))
        pad = max(0.3 * (high - low), 1.0)
        axis.set_ylim(low - pad, high + pad)  # zoomed in: the changes are small
        axis.ticklabel_format(axis="y", useOffset=False)
        axis.set_title(title)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(f"after memorising book {results['book']} ({results['settings']['max_tokens']} tokens)")
    figure.tight_layout()
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    subjects_asked = None if args.subjects is None else args.subjects.split(",")
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    settings.pop("methods")
    settings.pop("out")
    settings.pop("preset")  # in each method's config, which a resumed method is checked against
    if args.no_mmlu:  # the MMLU options are not read
        settings.update(mmlu=None, shots=None, limit_per_subject=None, subjects=None)
    else:
        settings.pop("no_mmlu")  # the settings of a run with MMLU as before this option
    args.out.mkdir(parents=True, exist_ok=True)
    open_state_folder(args.out, {"model": "default", **settings})
    subjects = [] if args.no_mmlu else mmlu.load_mmlu(args.mmlu, subjects_asked, args.limit_per_subject, args.shots)
    model, tokenizer = load_model()
    book = read_book(args.pg19 / f"{args.book}.txt", tokenizer, args.max_tokens, args.chunk_size)
    probes = [read_book(args.pg19 / f"{name}.txt", tokenizer, args.probe_tokens, 2) for name in args.probes]

    base_path = args.out / "base.json"
    if base_path.exists():
        base = json.loads(base_path.read_text(encoding="utf-8"))
    else:
        base = forgetting.measure(model, tokenizer, subjects, probes, probe_window=args.probe_window)
        write_json(base, base_path)
    methods = {m: run_method(model, tokenizer, args, m, book, subjects, probes, base) for m in args.methods}

    results = {"settings": settings, "book": args.book, "base": base, "methods": methods}
    write_json(results, args.out / "results.json")
    plot(results, args.out / "forgetting.png")
    for row in methods.values():
        print(forgetting.format_summary({**row, "base": base}))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'forgetting.png'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError) as error:
        sys.exit(f"forgetting_embedded: error: {error}")
