"""PG-19 whole-book evaluation: the metrics against hand-computed values, and `locas eval pg19` end to end
on a tiny local model (results and plot, resume after Ctrl-C, one clear line per bad input)."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from cli_fixtures import SENTENCES, TEXT, save_tiny_model, tiny_tokenizer
from test_cli import error_line, run, usage_error

import locas.default_model
from locas.cli import main
from locas.evaluation import pg19
from locas.training import grpo, online
from locas.training.config import OnlineConfig
from locas.training.online import ChunkRecord, OnlineResult, chunk_spans

pytestmark = pytest.mark.usefixtures("offline", "one_thread")

CHUNKS = 6
TINY = ["--chunk-size", "16", "--context-window", "32", "--max-tokens", str(16 * CHUNKS), "--width", "8"]
TINY += ["--lora-rank", "4", "--save-every", "2"]
METHODS = ["--method", "none", "--method", "locas", "--method", "lora"]


def write_model_and_books(folder: Path) -> dict[str, Path]:
    """A tiny model folder and books `a`, `b` (several chunks each) and `c` (shorter than a chunk)."""
    paths = {"model": save_tiny_model(folder / "model", tiny_tokenizer(), hidden_size=32, seed=0)}
    for name, text in [("a", TEXT), ("b", " ".join(reversed(SENTENCES * 3))), ("c", "Hi.")]:
        paths[name] = folder / f"{name}.txt"
        paths[name].write_text(text, encoding="utf-8")
    return paths


def run_quietly(*argv: str | Path) -> tuple[int, str]:
    """main(argv) without a capsys fixture (for module-scoped fixtures) -> (exit code, stdout)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        code = main([str(arg) for arg in argv])
    return code, stdout.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_model_and_books(tmp_path_factory.mktemp("pg19"))


@pytest.fixture(scope="module")
def full_run(files: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted evaluation of none, locas and lora on books a and b: its argv, stdout and results."""
    out = tmp_path_factory.mktemp("full") / "results.json"
    argv = ["eval", "pg19", files["a"], files["b"], "--model", files["model"], *METHODS, *TINY, "--out", out]
    code, stdout = run_quietly(*argv)
    assert code == 0, stdout
    return {"argv": argv, "out": out, "stdout": stdout, "results": json.loads(out.read_text())}


# --- metrics -------------------------------------------------------------------------------------------


class CharTokenizer:
    """Token i decodes to 'é' (2 UTF-8 bytes) when i is odd, else 'a' (1 byte)."""

    def decode(self, token_ids: torch.Tensor) -> str:
        return "".join("é" if i % 2 else "a" for i in token_ids.tolist())


def fabricated(chunk_means: list[float], tokens: int, chunk_size: int, seconds: float = 1.0) -> OnlineResult:
    """An OnlineResult over `tokens` tokens whose chunk k has mean NLL chunk_means[k]."""
    records = []
    for index, ((start, end), mean) in enumerate(zip(chunk_spans(tokens, chunk_size), chunk_means, strict=True)):
        targets = end - max(start, 1)
        records.append(ChunkRecord(index, start, end, targets, mean * targets, seconds))
    return OnlineResult(OnlineConfig(), records, trainable_parameters=7)


BOOK_X = dict(chunk_means=[1.0, 2.0, 3.0, 2.0, 1.5, 1.0], tokens=210_000, chunk_size=40_000)
BOOK_Y = dict(chunk_means=[2.0, 2.0, 2.0], tokens=120_000, chunk_size=40_000)


def test_book_metrics_match_hand_computed_values() -> None:
    metrics = pg19.book_metrics(fabricated(**BOOK_X), torch.arange(210_000), CharTokenizer())
    # chunks end at 40K, 80K, ..., 200K, 210K; chunk 0 scores 39,999 tokens (the first has no prediction)
    assert metrics["tokens"] == 209_999
    assert metrics["nll_sum"] == 39_999 + 2 * 40_000 + 3 * 40_000 + 2 * 40_000 + 1.5 * 40_000 + 10_000
    assert metrics["ppl"] == pytest.approx(math.exp(389_999 / 209_999), rel=1e-12)
    at_marks = metrics["ppl_at_marks"]
    assert [(m["mark"], m["tokens_read"], m["tokens"]) for m in at_marks] == [
        (50_000, 80_000, 79_999),  # the first chunk ending at or past the mark
        (100_000, 120_000, 119_999),
        (150_000, 160_000, 159_999),
        (200_000, 200_000, 199_999),  # a chunk ending exactly on the mark
    ]
    expected = [119_999 / 79_999, 239_999 / 119_999, 319_999 / 159_999, 379_999 / 199_999]
    assert [m["ppl"] for m in at_marks] == pytest.approx([math.exp(nll) for nll in expected], rel=1e-12)
    deciles = metrics["ppl_at_percent"]
    assert [m["percent"] for m in deciles] == list(range(10, 101, 10))
    chunk_ends = [40_000, 80_000, 80_000, 120_000, 120_000, 160_000, 160_000, 200_000, 200_000, 210_000]
    assert [m["tokens_read"] for m in deciles] == chunk_ends  # 10% = 21,000 tokens -> the chunk ending at 40K
    assert deciles[-1]["ppl"] == metrics["ppl"]
    # targets are tokens 1 .. 209,999: 105,000 odd ones of 2 bytes, 104,999 even ones of 1 byte
    assert metrics["bytes"] == 2 * 105_000 + 104_999
    assert metrics["bits_per_byte"] == pytest.approx(389_999 / math.log(2) / 314_999, rel=1e-12)
    e = math.exp
    templora = (39_999 * e(1) + 40_000 * (e(2) + e(3) + e(2) + e(1.5)) + 10_000 * e(1)) / 209_999
    assert metrics["templora_ppl_convention"] == pytest.approx(templora, rel=1e-12)
    assert metrics["templora_ppl_convention"] > metrics["ppl"]  # the convention reads higher (Jensen)
    assert metrics["curve"]["tokens_read"] == [40_000, 80_000, 120_000, 160_000, 200_000, 210_000]
    assert metrics["curve"]["ppl"][0] == pytest.approx(e(1), rel=1e-12)
    assert (metrics["seconds"], metrics["trainable_parameters"]) == (6.0, 7)


def test_aggregate_pools_tokens_over_books_and_compares_time_with_none() -> None:
    def row(method: str, book: dict, seconds: float) -> dict:
        metrics = pg19.book_metrics(fabricated(**book, seconds=seconds), torch.arange(book["tokens"]), CharTokenizer())
        return {"method": method, **metrics, "peak_memory": {"kind": "process_peak_rss", "bytes": int(seconds)}}

    rows = [row("none", BOOK_X, 1.0), row("none", BOOK_Y, 1.0), row("locas", BOOK_X, 3.0), row("locas", BOOK_Y, 2.0)]
    summary = pg19.aggregate(rows)
    assert list(summary) == ["none", "locas"]
    locas = summary["locas"]
    assert (locas["books"], locas["tokens"]) == (2, 209_999 + 119_999)
    assert locas["ppl"] == pytest.approx(math.exp((389_999 + 2 * 119_999) / 329_998), rel=1e-12)
    assert locas["mean_book_ppl"] == pytest.approx((math.exp(389_999 / 209_999) + math.exp(2)) / 2, rel=1e-12)
    # book Y (120K tokens) reaches 50K and 100K only; at 50K: X 79,999 tokens (NLL 119,999), Y 79,999 (159,998)
    assert [m["mark"] for m in locas["ppl_at_marks"]] == [50_000, 100_000]
    assert locas["ppl_at_marks"][0]["ppl"] == pytest.approx(math.exp((119_999 + 159_998) / 159_998), rel=1e-12)
    assert locas["bits_per_byte"] == pytest.approx(
        (389_999 + 2 * 119_999) / math.log(2) / (314_999 + 2 * 60_000 + 59_999), rel=1e-12
    )
    assert (locas["seconds"], summary["none"]["seconds"]) == (3.0 * 6 + 2.0 * 3, 1.0 * 9)
    assert locas["seconds_vs_none"] == pytest.approx(24 / 9)
    assert summary["none"]["seconds_vs_none"] == 1.0
    assert locas["peak_memory"]["bytes"] == 3
    assert "seconds_vs_none" not in pg19.aggregate(rows[2:])["locas"]  # no none: no ratio


def test_method_labels_set_the_method_and_the_locas_init() -> None:
    configs = pg19.method_configs(["none", "locas", "locas:random_index", "lora"], OnlineConfig(width=8))
    assert list(configs) == ["none", "locas", "locas:random_index", "lora"]
    assert [c.method for c in configs.values()] == ["none", "locas", "locas", "lora"]
    assert configs["locas"].memory_init == "highest" and configs["locas:random_index"].memory_init == "random_index"
    assert (configs["locas"].lr, configs["locas"].steps_per_chunk) == (4e-3, 1)  # resolved method defaults
    assert (configs["lora"].lr, configs["lora"].steps_per_chunk) == (1e-3, 1)  # the default preset
    assert configs["locas:random_index"].width == 8


def test_read_book_tokenises_only_the_start_of_a_long_book(tmp_path: Path) -> None:
    tokenizer, seen = tiny_tokenizer(), []
    path = tmp_path / "long.txt"
    path.write_text(TEXT * 200, encoding="utf-8")

    def counting(text: str, **kwargs):
        seen.append(len(text))
        return tokenizer(text, **kwargs)

    whole = tokenizer(TEXT * 200, add_special_tokens=False).input_ids
    book = pg19.read_book(path, counting, max_tokens=64, chunk_size=16)
    assert book.token_ids.tolist() == whole[:64]
    assert sum(seen) < len(TEXT * 200) / 50
    assert pg19.read_book(path, tokenizer).token_ids.tolist() == whole


# --- the command ---------------------------------------------------------------------------------------


def test_eval_pg19_writes_results_and_a_plot(files: dict, full_run: dict) -> None:
    results, out = full_run["results"], full_run["out"]
    settings = {"model": str(files["model"]), "dtype": "auto", "max_tokens": 96, "weights_dtype": "float32"}
    settings.update(device="cpu", world_size=1)
    assert results["settings"] == settings
    assert list(results["methods"]) == ["none", "locas", "lora"]
    lora = results["methods"]["lora"]
    assert (lora["lr"], lora["steps_per_chunk"], lora["lora_rank"], lora["chunk_size"]) == (1e-3, 1, 4, 16)
    assert list(results["books"]) == ["a", "b"]

    tokenizer = tiny_tokenizer()
    for name in ("a", "b"):
        token_ids = tokenizer(files[name].read_text(), add_special_tokens=False).input_ids[:96]
        book_bytes = len(tokenizer.decode(token_ids[1:]).encode("utf-8"))
        rows = results["books"][name]
        assert list(rows) == ["none", "locas", "lora"]
        for label, row in rows.items():
            assert (row["book"], row["method"], row["config"]) == (name, label, results["methods"][label])
            assert (row["tokens"], row["bytes"]) == (95, book_bytes)
            assert row["ppl"] == pytest.approx(math.exp(row["nll_sum"] / 95))
            assert row["bits_per_byte"] == pytest.approx(row["nll_sum"] / math.log(2) / book_bytes)
            assert row["templora_ppl_convention"] > 1 and row["ppl_at_marks"] == []
            assert row["curve"]["tokens_read"] == [16, 32, 48, 64, 80, 96]
            assert row["ppl_at_percent"][-1]["ppl"] == row["curve"]["ppl"][-1] == row["ppl"]
            assert row["seconds"] > 0 and row["peak_memory"]["kind"] == "process_peak_rss"
        # score-first: chunk 0 is scored before any training, so every method starts from the backbone
        assert rows["locas"]["curve"]["ppl"][0] == pytest.approx(rows["none"]["curve"]["ppl"][0], rel=1e-5)
        assert rows["lora"]["curve"]["ppl"][0] == pytest.approx(rows["none"]["curve"]["ppl"][0], rel=1e-5)
        assert rows["lora"]["nll_sum"] != rows["none"]["nll_sum"]  # ... and then they learn
        assert [rows[m]["trainable_parameters"] for m in ("none", "locas")] == [0, 3 * 2 * 32 * 8]
        assert rows["lora"]["trainable_parameters"] > 0

    aggregate = results["aggregate"]
    assert list(aggregate) == ["none", "locas", "lora"]
    for label, method in aggregate.items():
        assert method["books"] == 2 and method["tokens"] == 190
        assert method["nll_sum"] == sum(results["books"][name][label]["nll_sum"] for name in ("a", "b"))
        assert method["seconds_vs_none"] == pytest.approx(method["seconds"] / aggregate["none"]["seconds"])
    assert aggregate["none"]["seconds_vs_none"] == 1.0

    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    state = out.with_suffix(".state")
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.json", "results.png", "results.state"]
    assert {p.name for p in state.glob("*.json")} == {"settings.json"} | {
        f"{book}.{label}.json" for book in "ab" for label in ("none", "locas", "lora")
    }
    assert not list(state.glob("*partial*"))
    assert "all books" in full_run["stdout"] and f"wrote {out} and {out.with_suffix('.png')}" in full_run["stdout"]


def test_locas_variants_are_two_methods(files: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "variants.json"
    argv = ["eval", "pg19", files["a"], "--model", files["model"], *TINY, "--out", out]
    code, stdout, _ = run(capsys, *argv, "--method", "locas:highest", "--method", "locas:random_index")
    assert code == 0
    rows = json.loads(out.read_text())["books"]["a"]
    assert [rows[label]["config"]["memory_init"] for label in rows] == ["highest", "random_index"]
    assert rows["locas:highest"]["nll_sum"] != rows["locas:random_index"]["nll_sum"]
    assert (out.with_suffix(".state") / "a.locas-random_index.json").exists()
    assert "locas:random_index" in stdout


def test_compile_reaches_the_trainer_and_gives_the_eager_numbers(
    files: dict, full_run: dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    modes = []  # torch.compile is replaced by a recorder: the padding to one shape per chunk is what runs
    monkeypatch.setattr(torch, "compile", lambda module, mode: modes.append(mode) or module)
    out = tmp_path / "compiled.json"
    argv = ["eval", "pg19", files["a"], "--model", files["model"], "--method", "locas", *TINY, "--out", out]
    code, _, err = run(capsys, *argv, "--compile", "reduce-overhead")
    assert code == 0, err
    row = json.loads(out.read_text())["books"]["a"]["locas"]
    assert modes == ["reduce-overhead"] and row["config"]["compile"] == "reduce-overhead"
    assert row["nll_sum"] == pytest.approx(full_run["results"]["books"]["a"]["locas"]["nll_sum"], rel=1e-5)
    code, _, err = run(capsys, *argv, "--compile", "fast")
    assert code == 2
    usage_error(err, "eval pg19", "--compile: invalid choice: 'fast'")


class Spy:
    """Wraps pg19.run_online_batch: records each batch run and the chunks it ran, and can press Ctrl-C after
    a chunk."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, interrupt: tuple[str, int] | None = None) -> None:
        self.chunks: dict[str, list[int]] = {}
        self.interrupt = interrupt
        self.run_online_batch = online.run_online_batch
        monkeypatch.setattr(pg19, "run_online_batch", self)

    def __call__(self, *args, description: str, **kwargs) -> list[OnlineResult]:
        self.chunks[description] = []

        def on_chunk(row: int, record: ChunkRecord, learner) -> None:
            if row == 0:
                self.chunks[description].append(record.index)
            if (description, record.index) == self.interrupt:
                raise KeyboardInterrupt

        return self.run_online_batch(*args, description=description, on_chunk=on_chunk, **kwargs)


def test_an_evaluation_interrupted_before_it_saved_anything_says_so(
    files: dict, full_run: dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    out = tmp_path / "results.json"
    Spy(monkeypatch, interrupt=("a none", 0))  # the first chunk of all, before --save-every 2 saved any
    code, _, err = run(capsys, *full_run["argv"][:-1], out)
    assert code == 130
    assert err.rstrip().endswith(
        "locas eval pg19: interrupted; nothing was saved yet; run the same command to start again"
    )


@pytest.mark.parametrize("method", ["locas", "lora"])
def test_an_interrupted_evaluation_resumes_to_the_same_numbers(
    files: dict, full_run: dict, tmp_path: Path, method: str, monkeypatch, capsys
) -> None:
    out = tmp_path / "results.json"
    argv = [*full_run["argv"][:-1], out]
    spy = Spy(monkeypatch, interrupt=(f"a {method}", 3))  # --save-every 2: chunks 0-1 saved, 2-3 lost
    code, _, err = run(capsys, *argv)
    assert code == 130
    assert (
        f"locas eval pg19: interrupted; the state so far is in {out.with_suffix('.state')}/ (saved every "
        "--save-every chunks); run the same command to resume\n"
    ) in err  # after the progress bar of the pair that was running
    assert not out.exists() and not out.with_suffix(".png").exists()
    assert (out.with_suffix(".state") / "a.none.json").exists()

    spy = Spy(monkeypatch)
    code, _, err = run(capsys, *argv)
    assert code == 0
    state = out.with_suffix(".state")
    assert f"a none: finished earlier, read from {state / 'a.none.json'}\n" in err
    assert f"a {method}: resuming after chunk 2 of 6 from {state / f'a.{method}.pt'}\n" in err
    assert f"a {method}" in spy.chunks and "a none" not in spy.chunks  # the finished pair is not run again
    assert spy.chunks[f"a {method}"] == [2, 3, 4, 5]  # resumed after the last saved chunk
    resumed, uninterrupted = json.loads(out.read_text()), full_run["results"]
    for name, rows in uninterrupted["books"].items():
        for label, row in rows.items():
            again = resumed["books"][name][label]
            for key in ("tokens", "bytes", "nll_sum", "ppl", "bits_per_byte", "templora_ppl_convention", "curve"):
                assert again[key] == row[key], (name, label, key)
    for label, method_summary in uninterrupted["aggregate"].items():
        assert resumed["aggregate"][label]["ppl"] == method_summary["ppl"]


def test_the_table_without_none_shows_no_ratio(full_run: dict) -> None:
    results = full_run["results"]
    rows = [row for methods in results["books"].values() for label, row in methods.items() if label != "none"]
    table = pg19.format_table({"books": {}, "aggregate": pg19.aggregate(rows)})
    assert "nan" not in table
    for label in ("locas", "lora"):
        (line,) = [line for line in table.splitlines() if line.split()[:1] == [label]]
        assert line.split()[6] == "-", line  # the "x none" column
    with_none = pg19.format_table(results)
    (line,) = [line for line in with_none.splitlines() if line.split()[:1] == ["none"]]
    assert line.split()[6] == "1.00"


def test_a_finished_evaluation_run_again_only_rewrites_the_results(full_run: dict, monkeypatch, capsys) -> None:
    spy = Spy(monkeypatch)
    model = Path(full_run["argv"][full_run["argv"].index("--model") + 1])
    monkeypatch.chdir(model.parent)  # the same model folder, named relatively: the same run
    argv = [model.name if Path(arg) == model else arg for arg in full_run["argv"]]
    code, stdout, _ = run(capsys, *argv)
    assert code == 0 and spy.chunks == {}
    again = json.loads(full_run["out"].read_text())
    assert again["aggregate"] == full_run["results"]["aggregate"]
    assert stdout.splitlines()[:7] == full_run["stdout"].splitlines()[:7]  # the per-book table


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--max-tokens", "80"], ["holds a run with other settings", "--max-tokens 96 -> 80", "delete it"]),
        # --lr changes locas (none ignores it: the none pair stays valid)
        (["--lr", "0.01"], ["the finished run in", "a.locas.json", "used other settings"]),
    ],
)
def test_saved_state_of_other_settings_is_refused(full_run: dict, flags: list[str], fragments, capsys) -> None:
    state = full_run["out"].with_suffix(".state")
    before = {p.name: p.stat().st_mtime_ns for p in state.iterdir()}
    code, _, err = run(capsys, *full_run["argv"], *flags)
    assert code == 2
    error_line(err, "eval pg19", *fragments)
    assert {p.name: p.stat().st_mtime_ns for p in state.iterdir()} == before


def test_saved_state_in_another_weights_dtype_is_refused(full_run: dict, capsys) -> None:
    """`--dtype auto` loads by device (float32 on a CPU): a run saved where auto gave bfloat16 must not resume."""
    saved = full_run["out"].with_suffix(".state") / "settings.json"
    original = saved.read_text()
    try:
        saved.write_text(original.replace('"weights_dtype": "float32"', '"weights_dtype": "bfloat16"'))
        assert saved.read_text() != original
        code, _, err = run(capsys, *full_run["argv"])
        assert code == 2
        error_line(err, "eval pg19", "other settings", "weights_dtype bfloat16 -> float32", "delete it")
    finally:
        saved.write_text(original)


# --- bad input: one line, exit 2, nothing written ------------------------------------------------------


@pytest.mark.parametrize(
    ("books", "flags", "fragments", "before_model"),
    [
        ([], ["--method", "gpt"], ["unknown --method 'gpt'", "locas, lora, none, long"], True),
        ([], ["--method", "lora:highest"], ["'lora:highest'", "only locas takes an init"], True),
        ([], ["--method", "locas:biggest"], ["unknown --init 'biggest'"], True),
        ([], ["--method", "none", "--method", "none"], ["'none' is given twice"], True),
        (
            [],
            ["--method", "locas", "--context-window", "8"],
            ["--chunk-size 16 is larger than --context-window 8"],
            True,
        ),
        ([], ["--method", "lora", "--loss", "grpo"], ["loss 'grpo' trains a Locas memory", "not a LoRA"], True),
        (
            [],
            ["--method", "locas", "--loss", "grpo", "--steps-per-chunk", "2"],
            ["--steps-per-chunk 2: --loss 'grpo' has no token-loss steps", "use --loss 'ntp+grpo'"],
            True,
        ),
        (
            [],
            ["--method", "none", "--max-tokens", "8"],
            ["--max-tokens 8 is less than one chunk (--chunk-size 16)"],
            True,
        ),
        (["{missing}"], ["--method", "none"], ["{missing}", "does not exist"], True),
        (["{empty}"], ["--method", "none"], ["{empty}", "is empty"], True),
        (["{same_name}"], ["--method", "none"], ["{a}", "{same_name}", "have the same name"], True),
        (["{a}"], ["--method", "none"], ["{a}", "is given twice; pass each book once"], True),
        (["{c}"], ["--method", "none"], ["{c}", "has 3 tokens, fewer than one chunk of 16"], False),
        ([], ["--method", "lora", "--lora-targets", "bogus_proj"], ["bogus_proj"], False),  # refused by the learner
    ],
)
def test_refusals_are_one_line(
    files: dict, tmp_path: Path, books: list[str], flags: list[str], fragments, before_model: bool, monkeypatch, capsys
) -> None:
    folder = tmp_path / "books"
    (folder / "other").mkdir(parents=True)
    (folder / "empty.txt").write_text(" \n", encoding="utf-8")
    (folder / "other" / "a.txt").write_text(TEXT, encoding="utf-8")
    paths = {
        **files,
        "missing": folder / "missing.txt",
        "empty": folder / "empty.txt",
        "same_name": folder / "other/a.txt",
    }
    books, fragments = [b.format_map(paths) for b in books], [f.format_map(paths) for f in fragments]
    if before_model:
        monkeypatch.setattr(locas.default_model, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out" / "results.json"
    out.parent.mkdir()
    argv = ["eval", "pg19", files["a"], *books, "--model", files["model"], *TINY, *flags, "--out", out]
    code, stdout, err = run(capsys, *argv)
    assert code == 2 and stdout == ""
    error_line(err, "eval pg19", *fragments)
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("out", "fragments"),
    [
        ("results.txt", ["should end in .json", "results.json"]),
        ("no/such/folder/results.json", ["does not exist; create it first"]),
    ],
)
def test_bad_out_path(files: dict, tmp_path: Path, out: str, fragments: list[str], capsys) -> None:
    argv = ["eval", "pg19", files["a"], "--model", files["model"], "--method", "none", *TINY]
    code, _, err = run(capsys, *argv, "--out", tmp_path / out)
    assert code == 2
    error_line(err, "eval pg19", *fragments)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--chunk-size", "1"], ["argument --chunk-size", "at least 2"]),
        (["--max-tokens", "0"], ["argument --max-tokens", "at least 2"]),
        (["--context-window", "-1"], ["argument --context-window", "must be >= 0"]),
        (["--width", "0"], ["argument --width", "must be a positive integer"]),
        (["--lr", "-1"], ["argument --lr", "must be a positive number"]),
        (["--steps-per-chunk", "two"], ["argument --steps-per-chunk: must be an integer, got 'two'"]),
        (["--mix-alpha", "1.5"], ["argument --mix-alpha", "between 0 and 1"]),
        (["--save-every", "0"], ["argument --save-every", "must be a positive integer"]),
        (["--loss", "kl"], ["argument --loss", "invalid choice"]),
        (["--grpo-clip-epsilon", "-0.1"], ["argument --grpo-clip-epsilon", ">= 0 and < 1"]),
        (["--grpo-updates-per-batch", "0"], ["argument --grpo-updates-per-batch", "must be a positive integer"]),
        (["--init", "biggest"], ["argument --init", "invalid choice"]),
    ],
)
def test_bad_numbers_are_usage_errors(files: dict, tmp_path: Path, flags: list[str], fragments, capsys) -> None:
    argv = ["eval", "pg19", files["a"], "--model", files["model"], "--method", "locas", "--out", tmp_path / "r.json"]
    code, stdout, err = run(capsys, *argv, *flags)
    assert code == 2 and stdout == ""
    usage_error(err, "eval pg19", *fragments)
    assert list(tmp_path.iterdir()) == []


def test_method_is_required(files: dict, tmp_path: Path, capsys) -> None:
    code, _, err = run(capsys, "eval", "pg19", files["a"], "--out", tmp_path / "r.json")
    assert code == 2
    usage_error(err, "eval pg19", "--method")


def test_books_adapted_in_one_batch_give_each_books_own_numbers(files: dict, full_run: dict, tmp_path: Path) -> None:
    out = tmp_path / "batched.json"
    argv = [*full_run["argv"][:-1], out, "--batch-books", "2"]
    code, stdout = run_quietly(*argv)
    assert code == 0, stdout
    batched, alone = json.loads(out.read_text()), full_run["results"]
    state = out.with_suffix(".state")
    assert sorted(p.name for p in state.glob("*.pt")) == []  # finished pairs keep their rows, not their state
    for name, rows in alone["books"].items():
        for label, row in rows.items():
            again = batched["books"][name][label]
            assert again["batch_books"] == (1 if label == "lora" else 2)
            assert again["nll_sum"] == pytest.approx(row["nll_sum"], rel=1e-5), (name, label)


GRPO = ["--grpo-prompt-tokens", "8", "--grpo-continuation-tokens", "4", "--grpo-max-new-tokens", "4"]
GRPO += ["--grpo-group-size", "2", "--grpo-prompts-per-chunk", "2"]


def test_eval_pg19_trains_locas_with_grpo(files: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    # a dense stand-in for token F1, which a random model almost never earns (no reward, nothing learnt)
    monkeypatch.setattr(grpo, "recall_reward", lambda tokenizer: lambda sample, truth: (sample < 160).float().mean())
    out = tmp_path / "grpo.json"
    argv = ["eval", "pg19", files["a"], "--model", files["model"], "--method", "none", "--method", "locas", *TINY]
    code, _, err = run(capsys, *argv, "--loss", "grpo", *GRPO, "--tau-rule", "paper", "--out", out)
    assert code == 0, err
    results = json.loads(out.read_text())
    locas = results["methods"]["locas"]
    assert (locas["loss"], locas["steps_per_chunk"], locas["grpo_group_size"]) == ("grpo", 0, 2)
    assert results["methods"]["none"]["loss"] == "ntp"  # trains nothing: the GRPO options do not label it
    rows = results["books"]["a"]
    assert rows["locas"]["curve"]["ppl"][0] == pytest.approx(rows["none"]["curve"]["ppl"][0], rel=1e-5)
    assert rows["locas"]["nll_sum"] != pytest.approx(rows["none"]["nll_sum"], rel=1e-6)  # GRPO moved the memory


def test_grpo_adapts_one_book_at_a_time(files: dict, tmp_path: Path, capsys) -> None:
    argv = ["eval", "pg19", files["a"], files["b"], "--model", files["model"], "--method", "locas", *TINY, *GRPO]
    code, _, err = run(capsys, *argv, "--loss", "ntp+grpo", "--batch-books", "2", "--out", tmp_path / "r.json")
    assert code == 0, err
    state = (tmp_path / "r.json").with_suffix(".state")
    for book in ("a", "b"):  # not one a+b batch
        assert json.loads((state / f"{book}.locas.json").read_text())["batch_books"] == 1
    assert list(state.glob("*.pt")) == []
