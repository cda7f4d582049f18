"""benchmarks/pg19_sweep.py on a tiny local model: the points, the JSONL lines and their resume, the Pareto
fronts against hand-made points, the table and the plot."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from cli_fixtures import SENTENCES, TEXT, save_tiny_model, tiny_tokenizer

from locas.training.config import PAPER, PRESETS, OnlineConfig

pytestmark = pytest.mark.usefixtures("offline", "one_thread")


def load_sweep():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pg19_sweep.py"
    spec = importlib.util.spec_from_file_location("pg19_sweep", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["pg19_sweep"] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


sweep = load_sweep()
TINY_GRIDS = {
    "focused": {"locas": [{"lr": [1e-2, 3e-2], "width": [8]}], "lora": [{"lora_rank": [4], "lr": [1e-3, 3e-3]}]}
}
BASE = OnlineConfig(chunk_size=16, context_window=16)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random 2-layer Llama whose MLP is wide enough for the paper's 64 slots, and two books."""
    folder = tmp_path_factory.mktemp("sweep")
    save_tiny_model(folder / "model", tiny_tokenizer(), hidden_size=32, seed=0, intermediate_size=80)
    books = folder / "books"
    books.mkdir()
    (books / "a.txt").write_text(TEXT, encoding="utf-8")
    (books / "b.txt").write_text(" ".join(reversed(SENTENCES * 3)), encoding="utf-8")
    return {"model": folder / "model", "books": books}


def sweep_argv(files: dict, out: Path, *extra: str) -> list[str]:
    return [
        *("--data", str(files["books"]), "--books", "2", "--max-tokens", "64", "--model", str(files["model"])),
        *("--chunk-size", "16", "--context-window", "16", "--max-points", "2", "--quiet", "--out", str(out), *extra),
    ]


@pytest.fixture(scope="module")
def finished(files: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A whole sweep of the tiny grids: 2 points per method and the `none` reference."""
    out = tmp_path_factory.mktemp("finished") / "points.jsonl"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep, "GRIDS", TINY_GRIDS)
        patch.setitem(PRESETS, "default", PAPER)  # one preset point per method, then the grid
        assert sweep.main(sweep_argv(files, out)) == 0
    return {"out": out, "rows": [json.loads(line) for line in out.read_text().splitlines()]}


def test_a_sweep_writes_one_line_per_point(finished: dict) -> None:
    rows = finished["rows"]
    assert [(row["method"], row["kind"]) for row in rows] == [
        ("none", "reference"),
        ("locas", "paper"),
        ("locas", "grid"),
        ("lora", "paper"),
        ("lora", "grid"),
    ]
    for row in rows:
        assert row["data"] == {"model": row["data"]["model"], "dtype": "auto", "books": ["a", "b"], "max_tokens": 64}
        assert set(row["books"]) == {"a", "b"} and row["tokens"] == 2 * 63
        assert row["ppl"] == pytest.approx(math.exp(row["nll_sum"] / row["tokens"]))
        assert row["seconds"] == pytest.approx(sum(book["seconds"] for book in row["books"].values()))
        assert row["seconds"] > 0 and row["config"]["chunk_size"] == 16
    params = {(row["method"], row["kind"]): row["trainable_parameters"] for row in rows}
    assert params["none", "reference"] == 0
    assert params["locas", "paper"] == 3 * 2 * 64 * 32  # up, gate and down of 64 slots on 2 layers of 32
    assert params["locas", "grid"] == 3 * 2 * 8 * 32
    assert params["lora", "paper"] > params["lora", "grid"] > 0  # rank 64 against 4
    assert rows[1]["knobs"] == {"lr": 4e-3, "width": 64} and rows[4]["knobs"]["lora_rank"] == 4
    assert not finished["out"].with_suffix(".state").exists() or not any(
        finished["out"].with_suffix(".state").iterdir()
    )


def test_the_plot_is_written(finished: dict) -> None:
    assert finished["out"].with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_a_restarted_sweep_runs_only_the_points_not_in_the_file(
    files: dict, finished: dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    out = tmp_path / "points.jsonl"
    lines = finished["out"].read_text().splitlines()
    out.write_text("\n".join(lines[:3]) + '\n{"method": "lo')  # two points missing, the last line cut short
    ran = []
    run_books = sweep.pg19.run_books

    def counted(model, tokenizer, books, label, config, *args, **kwargs):
        ran.append((config.method, config.lr))
        return run_books(model, tokenizer, books, label, config, *args, **kwargs)

    monkeypatch.setattr(sweep, "GRIDS", TINY_GRIDS)
    monkeypatch.setitem(PRESETS, "default", PAPER)
    monkeypatch.setattr(sweep.pg19, "run_books", counted)
    assert sweep.main(sweep_argv(files, out)) == 0
    lora = sorted((row["method"], row["config"]["lr"]) for row in finished["rows"] if row["method"] == "lora")
    assert sorted(set(ran)) == lora and len(lora) == 2
    rows = sweep.read_rows(out)
    assert [row["method"] for row in rows] == ["none", "locas", "locas", "lora", "lora"]  # the cut line is skipped
    assert {sweep.row_key(row) for row in rows} == {sweep.row_key(row) for row in finished["rows"]}
    assert "lora: 2 points" in capsys.readouterr().out

    ran.clear()  # all done: a third run runs nothing, and --dry-run says so
    assert sweep.main(sweep_argv(files, out)) == 0 and ran == []
    assert sweep.main(sweep_argv(files, out, "--dry-run")) == 0
    listing = capsys.readouterr().out
    assert listing.count(" done ") == 5 and "to run" not in listing


def test_other_books_are_other_points(files: dict, finished: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "points.jsonl"
    out.write_text(finished["out"].read_text())
    monkeypatch.setattr(sweep, "GRIDS", TINY_GRIDS)
    monkeypatch.setitem(PRESETS, "default", PAPER)
    assert sweep.main(sweep_argv(files, out, "--max-tokens", "48", "--dry-run")) == 0
    assert capsys.readouterr().out.count("to run") == 5


def test_points_per_method_paper_first_then_the_grid_in_order(monkeypatch) -> None:
    monkeypatch.setitem(PRESETS, "default", PAPER)  # (else the default point comes first)
    points = sweep.sweep_points(BASE, ["locas", "lora"], max_points=5, grid="wide")
    assert [p.method for p in points].count("locas") == [p.method for p in points].count("lora") == 5
    locas = [p for p in points if p.method == "locas"]
    assert locas[0].kind == "paper"
    assert locas[0].config == OnlineConfig(chunk_size=16, context_window=16, preset="paper").resolved()
    more = sweep.sweep_points(BASE, ["locas", "lora"], max_points=8, grid="wide")
    assert [p.config for p in more if p.method == "locas"][:5] == [p.config for p in locas]
    assert len({sweep.config_key(p.config) for p in more}) == len(more)  # no point twice
    # chunk_size 256 is larger than the 16-token window: those grid points are left out, and so no reference
    assert all(p.config.chunk_size == 16 for p in more)
    assert [(p.method, p.config.chunk_size) for p in more if p.method == "none"] == [("none", 16)]

    whole = sweep.sweep_points(BASE, ["locas"], max_points=None)  # the reference, the paper point, the sub-grids
    assert len(whole) == 2 + sum(math.prod(map(len, sub_grid.values())) for sub_grid in sweep.LOCAS_GRID)
    combinations = sweep.grid_combinations(sweep.LOCAS_GRID)  # sub-grid after sub-grid, the last knob fastest
    ratios = sweep.LOCAS_GRID[0]["output_ratio"]
    assert combinations[: len(ratios)] == [{"tau_rule": "output", "output_ratio": ratio} for ratio in ratios]
    neuron = next(i for i, sub_grid in enumerate(sweep.LOCAS_GRID) if "steps_per_chunk" in sub_grid)
    offset = sum(math.prod(map(len, sub_grid.values())) for sub_grid in sweep.LOCAS_GRID[:neuron])
    lr = sweep.LOCAS_GRID[neuron]["lr"][0]
    following = combinations[offset : offset + 2]
    assert following == [{"tau_rule": "neuron", "lr": lr, "steps_per_chunk": steps} for steps in (1, 2)]
    grid = [p.config for p in whole if p.kind == "grid"]
    ran = [{name: getattr(config, name) for name in values} for config, values in zip(grid, combinations, strict=True)]
    assert ran == combinations
    assert sweep.knob_names("none") == ["chunk_size", "context_window"]


def test_the_default_preset_is_the_first_point(monkeypatch) -> None:
    monkeypatch.setitem(PRESETS, "default", PAPER)  # the same settings: one point
    assert [p.kind for p in sweep.sweep_points(BASE, ["lora"], None, grid="presets")] == ["reference", "paper"]
    monkeypatch.setitem(PRESETS, "default", {"lora": {**PAPER["lora"], "lr": 1e-3}})
    points = sweep.sweep_points(BASE, ["lora"], max_points=3)
    assert [p.kind for p in points] == ["reference", "default", "paper", "grid"]
    assert points[1].config.lr == 1e-3 and points[1].config.lora_rank == 64
    assert [p.kind for p in sweep.sweep_points(BASE, ["lora"], max_points=1)] == ["reference", "default"]
    assert set(sweep.knob_names("lora")) >= {"lr", "lora_rank", "lora_alpha", "lora_targets"}


def test_pareto_front_of_hand_made_points() -> None:
    points = [(1, 10), (2, 9), (2, 8), (3, 8), (4, 5), (0.5, 12), (5, 5), (4, 5), (6, 4)]
    # (2, 9) and (3, 8) lose to (2, 8); (5, 5) to (4, 5); of the two (4, 5), one
    assert sweep.pareto_front(points) == [5, 0, 2, 4, 8]
    assert sweep.pareto_front([]) == [] and sweep.pareto_front([(3, 1)]) == [0]


def test_the_table_lists_each_methods_pareto_best_points(monkeypatch) -> None:
    default = {**PRESETS["default"], "locas": {**PAPER["locas"], "lr": 0.01}}
    monkeypatch.setitem(PRESETS, "default", default)

    def row(method: str, kind: str, ppl: float, seconds: float, params: int, config: OnlineConfig) -> dict:
        knobs = {name: getattr(config, name) for name in sweep.knob_names(method)}
        return dict(method=method, kind=kind, ppl=ppl, seconds=seconds, trainable_parameters=params, knobs=knobs)

    def locas(kind: str, ppl: float, seconds: float, params: int, lr: float) -> dict:
        config = OnlineConfig(chunk_size=512, context_window=512, preset="paper", lr=lr).resolved()
        return row("locas", kind, ppl, seconds, params, config) | {"config": dataclasses.asdict(config)}

    rows = [
        row("none", "reference", 50.0, 10.0, 0, OnlineConfig(method="none", chunk_size=512, context_window=512)),
        locas("paper", 45.0, 100, 1000, 0.004),
        locas("grid", 44.0, 300, 1000, 0.01),  # on the seconds front (better PPL, slower) and the parameters front
        locas("grid", 46.0, 200, 4000, 0.03),  # beaten on both
        locas("grid", 47.0, 50, 8000, 0.001),  # fastest: on the seconds front only
    ]
    table = sweep.format_table(rows)
    assert "none: PPL 50.000 in 10 s (chunk_size=512 context_window=512)" in table
    lines = [line for line in table.splitlines() if line.startswith(("s", "p")) and "PPL" not in line]
    assert [line.split()[:3] for line in lines] == [
        ["s", "47.000", "50"],
        ["s", "45.000", "100"],
        ["s,p", "44.000", "300"],
    ]
    assert lines[1].endswith("(paper)") and lines[2].endswith("(default)") and "0.03" not in table
    assert "paper settings: PPL 45.000 in 100 s, 1,000 parameters" in table
    assert "default settings: PPL 44.000 in 300 s, 1,000 parameters" in table


def test_a_grid_point_equal_to_the_default_runs_once(monkeypatch) -> None:
    default = {**PAPER["lora"], "lr": sweep.LORA_GRID[0]["lr"][0], "steps_per_chunk": 1}
    monkeypatch.setitem(PRESETS, "default", {**PRESETS["default"], "lora": default})
    points = sweep.sweep_points(BASE, ["lora"], None)
    assert [p.kind for p in points[:3]] == ["reference", "default", "paper"]
    assert points[1].config == OnlineConfig(method="lora", chunk_size=16, context_window=16).resolved()
    keys = [sweep.config_key(p.config) for p in points]
    assert len(set(keys)) == len(keys)  # the grid's first point is the default: run once
    assert len([p for p in points if p.kind == "grid"]) == len(sweep.grid_combinations(sweep.LORA_GRID)) - 1


def test_named_points_replace_the_presets_and_the_grid(files: dict, tmp_path: Path, capsys) -> None:
    named = [sweep.parse_point("lr=2e-4 steps_per_chunk=1"), sweep.parse_point("lora_targets=q_proj,v_proj")]
    assert named[0] == {"lr": 2e-4, "steps_per_chunk": 1}
    points = sweep.sweep_points(BASE, ["lora"], None, named=named)
    assert [p.kind for p in points] == ["reference", "grid", "grid"]
    first, second = (p.config for p in points[1:])
    assert (first.lr, first.steps_per_chunk, first.lora_rank) == (2e-4, 1, PAPER["lora"]["lora_rank"])
    assert second.lora_targets == "q_proj,v_proj" and second.lr == PAPER["lora"]["lr"]  # the paper's otherwise
    alpha = sweep.parse_point("lora_alpha=64 max_width=None width=8")
    assert alpha == {"lora_alpha": 64.0, "max_width": None, "width": 8} and isinstance(alpha["lora_alpha"], float)
    assert (
        sweep.sweep_points(BASE, ["lora"], None, named=[{"lora_alpha": 64.0, "lora_rank": 4}])[1].config.lora_alpha
        == 64.0
    )
    with pytest.raises(ValueError, match="lr takes a float, not 'fast'"):
        sweep.parse_point("lr=fast")
    for values, ignored in (({"lora_rank": 8}, "lora_rank"), ({"output_ratio": 0.2}, "output_ratio")):
        with pytest.raises(ValueError, match=f"method 'locas' does not use {ignored} with these settings"):
            sweep.sweep_points(BASE, ["locas"], None, named=[values])
    both = sweep.sweep_points(BASE, ["locas"], None, named=[{"tau_rule": "output", "output_ratio": 0.2}])
    assert both[1].config.output_ratio == 0.2
    window = sweep.sweep_points(BASE, ["locas"], None, named=[{"context_window": 32, "loss": "sd"}])[1].config
    assert (
        window.teacher_window
        == OnlineConfig(chunk_size=16, context_window=32, loss="sd").resolved().teacher_window
        == 128
    )
    for text, message in (("lr", "is not name=value"), ("learning_rate=1", "no option 'learning_rate'")):
        with pytest.raises(SystemExit):
            sweep.parse_args(["--point", text])
        assert message in capsys.readouterr().err
    out = tmp_path / "points.jsonl"
    assert sweep.main(sweep_argv(files, out, "--methods", "locas", "--point", "width=8 lr=1e-2")) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(row["method"], row["config"].get("width"), row["config"].get("lr")) for row in rows] == [
        ("none", 64, 0.0),
        ("locas", 8, 1e-2),
    ]


def test_a_finished_pg19_run_on_the_same_books_is_added_as_points(files: dict, tmp_path: Path, capsys) -> None:
    from locas.cli import main as locas_main

    results = tmp_path / "results.json"
    books = sorted(str(path) for path in files["books"].glob("*.txt"))
    window = ("--chunk-size", "16", "--context-window", "16", "--max-tokens", "64")
    argv = ["eval", "pg19", *books, "--model", str(files["model"]), "--method", "none", "--method", "locas"]
    assert locas_main([*argv, "--preset", "paper", "--width", "8", "--lr", "1e-2", *window, "--out", str(results)]) == 0
    out = tmp_path / "points.jsonl"
    assert sweep.main(sweep_argv(files, out, "--methods", "locas", "--point", "width=8 lr=1e-2")) == 0
    swept = {row["method"]: row for row in sweep.read_rows(out)}
    out.unlink()
    assert sweep.main(sweep_argv(files, out, "--add", str(results))) == 0
    added = {row["method"]: row for row in sweep.read_rows(out)}
    assert set(added) == {"none", "locas"} and added["locas"]["kind"] == "grid"
    for method, row in added.items():  # the same point as the sweep's own run of it, with the same numbers
        assert sweep.row_key(row) == sweep.row_key(swept[method])
        assert row["ppl"] == pytest.approx(swept[method]["ppl"], rel=1e-5)
    assert sweep.main(sweep_argv(files, out, "--add", str(results))) == 0  # added once only
    assert len(sweep.read_rows(out)) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"other development books: max_tokens 64 \(the sweep: 32\)"):
        sweep.main([*sweep_argv(files, out, "--add", str(results)), "--max-tokens", "32"])
