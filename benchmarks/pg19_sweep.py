"""Sweep the knobs of Locas and TempLoRA on PG-19 development books: perplexity against wall time and against
trainable parameters, with each method's Pareto front (issue 8).

Each method gets its default point (`--preset default`, when it differs), its paper point (`--preset paper`),
then the points of its grid below, in order (`--grid focused`, the default, `wide`, or `presets`: none;
--max-points N keeps each method's first N; `--point 'lr=2e-4 steps_per_chunk=1'`, repeated, runs those points
instead). The focused grids give both methods the same number of points. A
grid point is the paper's settings with the point's knob values; None is the sweep's base value (--chunk-size).
`none` (the backbone, same window) runs once per chunk and window as the reference.

A point runs every development book online, score-first (`pg19.run_books`, one book at a time unless
--batch-books), and as soon as it finishes its line is appended to --out (JSONL): pooled PPL, wall seconds (sum
of the chunk times), trainable parameters, per-book PPL and seconds, the knob values and the resolved config.
Started again, the sweep skips the points already in the file (same model, books, tokens and resolved config)
and resumes an interrupted point from its state (saved every --save-every chunks in OUT.state/). At the end, and
with --plot-only, it plots PPL against seconds and against trainable parameters (OUT .png) and prints each
method's Pareto-best points.

Development books: the first --max-tokens tokens (default 4,096: what 2 CPU cores sweep in a few hours; take 32K
on a GPU) of the last --books books of --data by file name (so not the books pg19_embedded.py evaluates).

    python benchmarks/pg19_sweep.py --dry-run       # list the points (done or to run)
    python benchmarks/pg19_sweep.py                 # run them; after Ctrl-C the same command resumes
    python benchmarks/pg19_sweep.py --plot-only     # the plot and the table from the JSONL file
    python benchmarks/pg19_sweep.py --add runs/x/results.json   # a `locas eval pg19` run on the same books
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from locas.evaluation import pg19
from locas.training.config import PRESETS, OnlineConfig, saved_config
from locas.training.online import lora_target_modules

REPO = Path(__file__).resolve().parents[1]
PG19 = REPO.parent / "shared" / "data" / "pg19"

# Each method's grid: sub-grids, each the product of its knob values, run in this order (the most telling points
# first, so that --max-points keeps them). A knob a point leaves out has the paper's value; None is the sweep's base
# value (--chunk-size). Focused on what the 8K-token study of issue 8 left open: under the per-slot output scale
# (`tau_rule` neuron) the learning rate and steps, then the width; TempLoRA gets as many points, around its
# tuned learning rate, then a smaller rank and other scales. (The second Locas sub-grid replaced lr 1e-2 with
# 2 steps per chunk once lr 1e-2 with 1 step had come out worse than no memory.)
LOCAS_GRID = [
    {"tau_rule": ["output"], "output_ratio": [0.1, 0.2, 0.05]},
    {"tau_rule": ["output"], "output_ratio": [0.1], "top_layers": [0.5]},
    {"tau_rule": ["output"], "output_ratio": [0.4]},
    {"tau_rule": ["output"], "output_ratio": [0.1], "lr": [6e-3, 2.5e-3]},
    {"tau_rule": ["neuron"], "lr": [4e-3, 2e-3], "steps_per_chunk": [1, 2]},
    {"tau_rule": ["neuron"], "lr": [1e-2, 6e-3, 3e-3]},
    {"tau_rule": ["neuron"], "width": [16, 256]},
    {"tau_rule": ["neuron"], "key_lr_scale": [0.1, 0.0]},
]
LORA_GRID = [
    {"lr": [5e-4, 2e-4, 2e-3], "steps_per_chunk": [1, 2]},
    {"lora_rank": [16], "lr": [5e-4, 2e-3], "steps_per_chunk": [1]},
    {"lr": [1e-3], "steps_per_chunk": [1]},
    {"lr": [5e-4], "steps_per_chunk": [1], "lora_alpha": [128.0, 16.0]},
]
# A wider search for a machine with time to spare (`--grid wide`): the same knobs and more, every combination.
WIDE_LOCAS_GRID = [
    {
        "lr": [1e-3, 4e-3, 1e-2, 3e-2],
        "steps_per_chunk": [1, 2],
        "width": [64, 256],
        "tau_rule": ["paper", "neuron", "output"],
        "memory_init": ["highest", "random_index"],
        "memorize_at": [0, 2],
        "grow_by": [0, 8],
        "loss": ["ntp", "sd", "mix"],
        "chunk_size": [None, 256],
    }
]
WIDE_LORA_GRID = [
    {
        "lora_rank": [8, 16, 64],
        "lora_alpha": [16.0, 64.0, 128.0],
        "lr": [5e-5, 2e-4, 1e-3, 3e-3],
        "steps_per_chunk": [1, 2],
        "lora_targets": ["all", "q_proj,k_proj,v_proj,o_proj", "gate_proj,up_proj,down_proj"],
        "chunk_size": [None, 256],
    }
]
GRIDS = {
    "focused": {"locas": LOCAS_GRID, "lora": LORA_GRID},
    "presets": {"locas": [], "lora": []},  # the paper and default points only (e.g. to check another model)
    "wide": {"locas": WIDE_LOCAS_GRID, "lora": WIDE_LORA_GRID},
}
METHODS = ("locas", "lora")
REFERENCE_KNOBS = ["chunk_size", "context_window"]


@dataclass
class Point:
    method: str
    kind: str  # "paper" or "default" (the method's preset), "grid", or "reference" (none)
    config: OnlineConfig  # resolved

    @property
    def knobs(self) -> dict:
        """The values of the knobs the method's grid varies (the chunk and window for `none`)."""
        return {name: getattr(self.config, name) for name in knob_names(self.method)}


def knob_names(method: str) -> list[str]:
    """The knobs any grid of `method` varies, in order (the chunk and window for `none`)."""
    if method not in METHODS:
        return REFERENCE_KNOBS
    grids = [sub_grid for grid in GRIDS.values() for sub_grid in grid[method]]
    return list(dict.fromkeys(name for sub_grid in grids for name in sub_grid))


def config_fields(config: OnlineConfig) -> dict:
    """The settings of a resolved config (without `preset`, which never tells runs apart)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.compare}


def config_key(config: OnlineConfig) -> str:
    return json.dumps(config_fields(config), sort_keys=True)


def point_key(data: dict, config: OnlineConfig) -> str:
    """What a point is: the development books (`data`: model, dtype, books, tokens) and the resolved config."""
    return json.dumps({"data": data, "config": config_fields(config)}, sort_keys=True)


def grid_combinations(sub_grids: Sequence[dict[str, list]]) -> list[dict]:
    """Every combination of each sub-grid's knob values, sub-grid after sub-grid."""
    return [
        dict(zip(sub_grid, values, strict=True))
        for sub_grid in sub_grids
        for values in itertools.product(*sub_grid.values())
    ]


def parse_point(text: str) -> dict:
    """The option values of a `--point` ("lr=2e-4 steps_per_chunk=1": `OnlineConfig` options, each converted to
    its field's type, "None" to None where the field allows it); ValueError naming the pair that does not parse."""
    hints = typing.get_type_hints(OnlineConfig)
    values = {}
    for pair in text.split():
        name, equals, value = pair.partition("=")
        if not equals or not value:
            raise ValueError(f"--point {text!r}: {pair!r} is not name=value")
        if name not in hints or name in ("method", "preset"):
            names = sorted(set(hints) - {"method", "preset"})
            raise ValueError(f"--point {text!r}: no option {name!r}; choose from {', '.join(names)}")
        kinds = typing.get_args(hints[name]) or (hints[name],)
        if value == "None" and type(None) in kinds:
            values[name] = None
            continue
        kind = next(kind for kind in kinds if kind is not type(None))
        try:
            values[name] = kind(value)
        except ValueError:
            raise ValueError(f"--point {text!r}: {name} takes a {kind.__name__}, not {value!r}") from None
    if not values:
        raise ValueError("--point needs at least one name=value")
    return values


def point_config(base: OnlineConfig, method: str, values: dict) -> OnlineConfig:
    """The paper's settings of `method` with `values` (knob -> value), resolved."""
    return dataclasses.replace(base, method=method, preset="paper", **values).resolved()


def sweep_points(
    base: OnlineConfig,
    methods: Sequence[str],
    max_points: int | None,
    grid: str = "focused",
    named: Sequence[dict] | None = None,
) -> list[Point]:
    """The `none` references, then per method its default point (`--preset default`, when not the paper's),
    its paper point and its grid's points in order, `max_points` in all (None: every one). `base` holds the chunk,
    window and training seed; grid points that the trainer refuses (e.g. a chunk larger than the window) or
    that repeat a point are left out. `named` (knob values, as `parse_point` gives): these points only, in
    place of the presets and the grid (`max_points` does not apply); ValueError for a value a method would not
    use (an option of another method, or one its other settings ignore)."""
    points = []
    for method in methods:
        if named:
            chosen = {}
            for values in named:
                config = point_config(base, method, values)
                if ignored := [name for name, value in values.items() if getattr(config, name) != value]:
                    raise ValueError(
                        f"method {method!r} does not use {', '.join(ignored)} with these settings (--point {values}; "
                        "e.g. output_ratio counts only with tau_rule=output, lora options only for lora)"
                    )
                chosen.setdefault(config_key(config), Point(method, "grid", config))
            points += list(chosen.values())
            continue
        paper = dataclasses.replace(base, method=method, preset="paper").resolved()
        default = dataclasses.replace(base, method=method, preset="default").resolved()
        chosen = (
            {} if config_key(default) == config_key(paper) else {config_key(default): Point(method, "default", default)}
        )
        chosen.setdefault(config_key(paper), Point(method, "paper", paper))
        for values in grid_combinations(GRIDS[grid][method]):
            if max_points is not None and len(chosen) >= max_points:
                break
            values = {name: value for name, value in values.items() if value is not None}
            try:
                config = point_config(base, method, values)
            except ValueError:
                continue
            chosen.setdefault(config_key(config), Point(method, "grid", config))
        points += list(chosen.values())[:max_points]
    windows = sorted({(p.config.chunk_size, p.config.context_window) for p in points if p.method != "none"})
    windows = windows or [(base.chunk_size, base.context_window)]
    references = [
        Point("none", "reference", dataclasses.replace(base, method="none", chunk_size=c, context_window=w).resolved())
        for c, w in windows
    ]
    return references + points


# --- the JSONL file ------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict]:
    """The finished points in `path` (none if it does not exist); a line cut short by a crash is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def row_key(row: dict) -> str:
    return point_key(row["data"], saved_config(row["config"]))


def append_row(row: dict, path: Path) -> None:
    """Append `row` as one JSON line, flushed and synced to disk before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", encoding="utf-8") as file:
        file.seek(0, os.SEEK_END)
        if file.tell() > 0:  # a line cut short by a crash must not swallow this one
            file.seek(file.tell() - 1)
            if file.read(1) != "\n":
                file.write("\n")
        file.write(json.dumps(row) + "\n")
        file.flush()
        os.fsync(file.fileno())


# --- running a point -----------------------------------------------------------------------------------


def run_point(
    model,
    tokenizer,
    books: Sequence[pg19.Book],
    point: Point,
    data: dict,
    folder: Path,
    *,
    batch_books: int = 1,
    save_every: int = 8,
    progress: bool = True,
) -> dict:
    """Run `point` over every book (resuming its state in `folder`); its JSONL row."""
    folder.mkdir(parents=True, exist_ok=True)
    size = 1 if point.method == "lora" or point.config.uses_grpo else batch_books
    rows = []
    for first in range(0, len(books), size):
        rows += pg19.run_books(
            model,
            tokenizer,
            books[first : first + size],
            point.method,
            point.config,
            folder,
            save_every=save_every,
            progress=progress,
        )
    return point_row(point, rows, data)


def point_row(point: Point, book_rows: Sequence[dict], data: dict) -> dict:
    """The JSONL row of `point` from its per-book results (`pg19.run_books` rows: book, nll_sum, tokens, ppl,
    seconds, trainable_parameters), pooled over the books."""
    nll_sum, tokens = sum(row["nll_sum"] for row in book_rows), sum(row["tokens"] for row in book_rows)
    return {
        "method": point.method,
        "kind": point.kind,
        "ppl": math.exp(nll_sum / tokens),
        "seconds": sum(row["seconds"] for row in book_rows),
        "trainable_parameters": max(row["trainable_parameters"] for row in book_rows),
        "nll_sum": nll_sum,
        "tokens": tokens,
        "books": {row["book"]: {"ppl": row["ppl"], "seconds": row["seconds"]} for row in book_rows},
        "knobs": point.knobs,
        "data": data,
        "config": dataclasses.asdict(point.config),
    }


def run_sweep(
    model,
    tokenizer,
    books: Sequence[pg19.Book],
    points: Sequence[Point],
    data: dict,
    out: Path,
    *,
    batch_books: int = 1,
    save_every: int = 8,
    progress: bool = True,
) -> list[dict]:
    """Run the points not yet in `out`, appending each one's row as it finishes; the rows of `points`."""
    done = {row_key(row): row for row in read_rows(out)}
    for number, point in enumerate(points, 1):
        key = point_key(data, point.config)
        if key in done:
            continue
        folder = out.with_suffix(".state") / f"{point.method}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        print(f"[{number}/{len(points)}] {point.method} {point.kind}: {describe(point.knobs)}", flush=True)
        row = run_point(
            model,
            tokenizer,
            books,
            point,
            data,
            folder,
            batch_books=batch_books,
            save_every=save_every,
            progress=progress,
        )
        append_row(row, out)
        shutil.rmtree(folder)  # the row holds what the sweep needs; a LoRA state is hundreds of MB
        print(
            f"    PPL {row['ppl']:.3f}  {row['seconds']:.0f} s  {row['trainable_parameters']:,} parameters", flush=True
        )
        done[key] = row
    return [done[point_key(data, point.config)] for point in points]


def rows_of_results(path: Path, data: dict) -> list[dict]:
    """The sweep rows of a finished `locas eval pg19 --out PATH` run on the development books `data` describes
    (one per method, pooled from its per-book results as a point's own run is); SystemExit naming what differs
    when it ran on other books, tokens, model or dtype, or when the file is not such a results file."""

    def malformed(error: Exception) -> SystemExit:
        return SystemExit(f"pg19_sweep: {path} is not a finished `locas eval pg19` results file ({error!r})")

    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        settings, books, methods = (results[key] for key in ("settings", "books", "methods"))
        ran = {"model": settings["model"], "dtype": settings["dtype"], "books": sorted(books)}
        ran["max_tokens"] = settings["max_tokens"]
        configs = {label: saved_config(methods[label]) for label in results["aggregate"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise malformed(error) from None
    wanted = {**data, "books": sorted(data["books"])}
    if differs := [
        f"{name} {ran[name]!r} (the sweep: {wanted[name]!r})" for name in wanted if ran[name] != wanted[name]
    ]:
        raise SystemExit(f"pg19_sweep: {path} ran on other development books: {', '.join(differs)}")
    try:
        return [
            point_row(
                Point(config.method, "reference" if config.method == "none" else "grid", config),
                [books[book][label] for book in data["books"]],
                data,
            )
            for label, config in configs.items()
        ]
    except (KeyError, TypeError) as error:
        raise malformed(error) from None


# --- Pareto fronts, plot, table ------------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, ppl) points that no other point beats on both (lower or equal cost and PPL, one of
    them lower), by increasing cost; of identical points, one."""
    front, best = [], math.inf
    for index in sorted(range(len(points)), key=lambda i: points[i]):
        if points[index][1] < best:
            front.append(index)
            best = points[index][1]
    return front


def presets_of(row: dict) -> list[str]:
    """The presets (of `PRESETS`, as they are now) whose settings a row's point ran with."""
    config = saved_config(row["config"])
    same_window = {name: getattr(config, name) for name in ("method", "chunk_size", "context_window", "seed")}
    return [
        preset
        for preset in PRESETS
        if config_key(OnlineConfig(**same_window, preset=preset).resolved()) == config_key(config)
    ]


AXES = {"seconds": "wall seconds (all books)", "trainable_parameters": "trainable parameters"}


def plot_sweep(rows: Sequence[dict], path: Path) -> None:
    """PPL against seconds and against trainable parameters: one colour per method, its Pareto front as a line,
    its paper point circled, its default point starred, and `none` as a dashed line per chunk and window."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 5))
    methods = [method for method in METHODS if any(row["method"] == method for row in rows)]
    colours = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for axis, cost in zip(axes, AXES, strict=True):
        for row in (row for row in rows if row["method"] == "none"):
            knobs = row["knobs"]
            label = f"none, chunk {knobs['chunk_size']} / window {knobs['context_window']} ({row['ppl']:.2f})"
            axis.axhline(row["ppl"], color="grey", linestyle="--", linewidth=1, label=label)
        for method in methods:
            mine = [row for row in rows if row["method"] == method]
            xy = [(row[cost], row["ppl"]) for row in mine]
            axis.scatter(*zip(*xy, strict=True), color=colours[method], alpha=0.45, s=18, label=method)
            front = [xy[i] for i in pareto_front(xy)]
            axis.plot(*zip(*front, strict=True), color=colours[method], marker="o", drawstyle="steps-post")
            for preset, marker in (("paper", "o"), ("default", "*")):
                marked = [(row[cost], row["ppl"]) for row in mine if preset in presets_of(row)]
                if marked:
                    xs, ys = zip(*marked, strict=True)
                    axis.scatter(xs, ys, s=160, marker=marker, facecolors="none", edgecolors=colours[method])
        axis.set(xscale="log", xlabel=AXES[cost], ylabel="perplexity (pooled over the books)")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize="small")
    data = rows[0]["data"]
    figure.suptitle(
        f"PG-19 sweep, {len(data['books'])} books x {data['max_tokens']} tokens, {data['model']}: "
        "Pareto fronts (lines), paper settings (circled), default settings (starred)"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    pg19.save_figure(figure, path)


def row_knobs(row: dict) -> dict:
    """The values of a row's knobs (`knob_names`), read from its config."""
    return Point(row["method"], row["kind"], saved_config(row["config"])).knobs


def describe(knobs: dict) -> str:
    return " ".join(f"{name}={value}" for name, value in knobs.items())


def format_table(rows: Sequence[dict]) -> str:
    """The references, then per method the points on its Pareto front of PPL against seconds (s) or against
    trainable parameters (p), by increasing seconds, each with its knob values."""
    lines = []
    for row in (row for row in rows if row["method"] == "none"):
        lines.append(f"none: PPL {row['ppl']:.3f} in {row['seconds']:.0f} s ({describe(row['knobs'])})")
    for method in METHODS:
        mine = [row for row in rows if row["method"] == method]
        if not mine:
            continue
        fronts = {
            flag: set(pareto_front([(row[cost], row["ppl"]) for row in mine]))
            for flag, cost in (("s", "seconds"), ("p", "trainable_parameters"))
        }
        best = sorted(
            (i for i in range(len(mine)) if any(i in front for front in fronts.values())),
            key=lambda i: mine[i]["seconds"],
        )
        knobs = [row_knobs(row) for row in mine]  # from the configs: a row written before a knob existed has its value
        varied = [name for name in knob_names(method) if len({str(values[name]) for values in knobs}) > 1]
        widths = {name: max(len(str(knobs[i][name])) for i in best) for name in varied}
        widths = {name: max(width, len(name)) for name, width in widths.items()}
        lines += ["", f"{method}: {len(mine)} points; Pareto-best (s: PPL vs seconds, p: PPL vs parameters)"]
        lines.append(
            f"{'front':<6}{'PPL':>9}{'seconds':>9}{'params':>12}  " + "  ".join(map(str.rjust, widths, widths.values()))
        )
        for i in best:
            row = mine[i]
            flags = ",".join(flag for flag, front in fronts.items() if i in front)
            mark = "".join(f" ({preset})" for preset in presets_of(row))
            values = "  ".join(str(knobs[i][name]).rjust(width) for name, width in widths.items())
            lines.append(
                f"{flags:<6}{row['ppl']:>9.3f}{row['seconds']:>9.0f}{row['trainable_parameters']:>12,}  {values}{mark}"
            )
        for preset in PRESETS:
            row = next((row for row in mine if preset in presets_of(row)), None)
            if row is not None:
                lines.append(
                    f"{preset} settings: PPL {row['ppl']:.3f} in {row['seconds']:.0f} s, "
                    f"{row['trainable_parameters']:,} parameters"
                )
    return "\n".join(lines)


# --- command line --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=PG19, help="folder of PG-19 books (default: %(default)s)")
    parser.add_argument("--books", type=int, default=4, help="the last N books by file name (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens read per book (default: %(default)s)")
    parser.add_argument("--chunk-size", type=int, default=512, help="base chunk (default: %(default)s)")
    parser.add_argument("--context-window", type=int, default=512, help="window (default: %(default)s)")
    parser.add_argument("--methods", default="locas,lora", help="methods swept, comma-separated (default: %(default)s)")
    parser.add_argument(
        "--max-points", type=int, default=0, help="each method's first N points, preset points first (default 0: all)"
    )
    parser.add_argument("--grid", default="focused", choices=list(GRIDS), help="which grids (default: %(default)s)")
    parser.add_argument(
        "--point",
        action="append",
        default=[],
        metavar="'NAME=VALUE ...'",
        help="run this point (the paper's settings with these options; repeat for more) instead of the presets and "
        "the grid, e.g. --point 'lr=2e-4 steps_per_chunk=1'",
    )
    parser.add_argument("--model", default=None, help="as `locas --model` (default: the embedded SmolLM2-135M)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda (default: where the model loads)")
    parser.add_argument("--batch-books", type=int, default=1, help="locas/none: adapt N books at once")
    parser.add_argument("--save-every", type=int, default=8, help="save a running point's state every N chunks")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "pg19_sweep" / "points.jsonl")
    parser.add_argument(
        "--add",
        action="append",
        type=Path,
        default=[],
        metavar="RESULTS.json",
        help="add the methods of a finished `locas eval pg19` run on the same books as points, then plot",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the points and exit")
    parser.add_argument("--plot-only", action="store_true", help="plot and print the points already in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.methods = [method.strip() for method in args.methods.split(",")]
    try:
        args.point = [parse_point(text) for text in args.point]
    except ValueError as error:
        parser.error(str(error))
    if args.max_points < 0:
        parser.error(f"--max-points must be >= 0 (0: every point), got {args.max_points}")
    if unknown := [method for method in args.methods if method not in METHODS]:
        parser.error(f"--methods: no grid for {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return args


def development_books(folder: Path, count: int) -> list[Path]:
    paths = sorted(folder.glob("*.txt"))
    if len(paths) < count:
        raise SystemExit(f"pg19_sweep: {folder} holds {len(paths)} books (.txt), fewer than --books {count}")
    return paths[-count:]


def check_lora_targets(points: Sequence[Point], model) -> None:
    """Refuse, before any point runs, LoRA targets that the model's family does not have."""
    from locas.families import family_of

    for point in points:
        if point.method == "lora":
            try:
                lora_target_modules(family_of(model), point.config.lora_targets)
            except ValueError as error:
                raise SystemExit(f"pg19_sweep: {error}; choose other lora_targets in the grid") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = development_books(args.data, args.books)
    data = {"model": args.model or "default", "dtype": args.dtype, "books": [path.stem for path in paths]}
    data["max_tokens"] = args.max_tokens
    if args.add:
        done = {row_key(row) for row in read_rows(args.out)}
        for path in args.add:
            for row in rows_of_results(path, data):
                if row_key(row) not in done:
                    append_row(row, args.out)
                    done.add(row_key(row))
                    print(f"added {row['method']} {describe(row['knobs'])}: PPL {row['ppl']:.3f} from {path}")
    if args.plot_only or args.add:
        return report(args.out, data)
    base = OnlineConfig(chunk_size=args.chunk_size, context_window=args.context_window)
    try:
        points = sweep_points(base, args.methods, args.max_points or None, args.grid, args.point)
    except ValueError as error:
        raise SystemExit(f"pg19_sweep: {error}") from None
    if args.dry_run:
        done = {row_key(row) for row in read_rows(args.out)}
        for number, point in enumerate(points, 1):
            status = "done" if point_key(data, point.config) in done else "to run"
            print(f"{number:>3} {point.method:<6} {point.kind:<9} {status:<7} {describe(point.knobs)}")
        print(f"{len(points)} points on books {', '.join(data['books'])} ({args.max_tokens} tokens each)")
        return 0

    import torch

    from locas.default_model import load_model

    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model, tokenizer = load_model(args.model, dtype=dtype, device=args.device)
    check_lora_targets(points, model)
    books = [pg19.read_book(path, tokenizer, args.max_tokens, args.chunk_size) for path in paths]
    try:
        rows = run_sweep(
            model,
            tokenizer,
            books,
            points,
            data,
            args.out,
            batch_books=args.batch_books,
            save_every=args.save_every,
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        print(f"pg19_sweep: interrupted; finished points are in {args.out}: run the same command to resume")
        return 130
    print(f"{len(rows)} points in {args.out}")
    return report(args.out, data)


def report(out: Path, data: dict) -> int:
    """Plot and print every point of `out` on the development books `data` describes."""
    rows = [row for row in read_rows(out) if row["data"] == data]
    if not rows:
        print(f"pg19_sweep: {out} holds no finished point on these books ({data})", file=sys.stderr)
        return 2
    plot = out.with_suffix(".png")
    plot_sweep(rows, plot)
    print(format_table(rows))
    print(f"wrote {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
