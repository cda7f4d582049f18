"""Forgetting: the paired bootstrap on hand-checkable data, probe perplexity, the comparison, and
`evaluate_forgetting` / `locas eval forgetting` end to end on a tiny model (the backbone given back unchanged,
the training resumed from its state file, one clear line per bad input), with MMLU and without it (the probe
perplexity only, also in benchmarks/forgetting_embedded.py)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_fixtures import SENTENCES, TEXT, save_tiny_model, tiny_tokenizer
from test_cli import error_line, run, usage_error
from test_mmlu import write_mmlu
from transformers import AutoModelForCausalLM

import locas.default_model
from locas.evaluation import forgetting, mmlu, pg19
from locas.evaluation.forgetting import paired_bootstrap, pooled_perplexity
from locas.evaluation.pg19 import Book, read_book
from locas.model import token_nll
from locas.training import online
from locas.training.config import OnlineConfig

pytestmark = pytest.mark.usefixtures("offline", "one_thread")

TRAINER = ["--chunk-size", "16", "--context-window", "32", "--max-tokens", "64", "--width", "8", "--lora-rank", "4"]
PROBES = ["--probe-tokens", "40", "--probe-window", "16", "--shots", "1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model, a book, two probe texts and an MMLU folder."""
    root = tmp_path_factory.mktemp("forgetting")
    paths = {"model": save_tiny_model(root / "model", tiny_tokenizer(), hidden_size=32, seed=0)}
    for name, text in [
        ("book", TEXT),
        ("p1", " ".join(reversed(SENTENCES * 2))),
        ("p2", " ".join(SENTENCES[1::2] * 4)),
    ]:
        paths[name] = root / f"{name}.txt"
        paths[name].write_text(text, encoding="utf-8")
    paths["mmlu"] = write_mmlu(root / "mmlu")
    return paths


# --- the bootstrap -------------------------------------------------------------------------------------


def test_identical_pairs_give_a_zero_width_interval_at_zero() -> None:
    values = [0.0, 1.0, 1.0, 0.0, 1.0]
    change = paired_bootstrap(values, values, resamples=500)
    assert (change["delta"], change["low"], change["high"]) == (0.0, 0.0, 0.0)
    assert (change["before"], change["after"]) == (0.6, 0.6)


def test_a_constant_shift_is_exact_and_one_changed_pair_of_two_spans_its_range() -> None:
    change = paired_bootstrap([0, 0, 0, 0], [1, 1, 1, 1], resamples=500)
    assert (change["delta"], change["low"], change["high"]) == (1.0, 1.0, 1.0)
    # Two pairs, one changed by 1: a resample's mean change is 0, 0.5 or 1 (probabilities 1/4, 1/2, 1/4).
    change = paired_bootstrap([0, 0], [1, 0], resamples=4000, seed=3)
    assert (change["delta"], change["low"], change["high"]) == (0.5, 0.0, 1.0)
    change = paired_bootstrap([0, 0], [1, 0], resamples=4000, confidence=0.4, seed=3)
    assert (change["low"], change["high"]) == (0.5, 0.5)


def test_the_bootstrap_is_seeded_and_keeps_pairs_together() -> None:
    rng = np.random.default_rng(0)
    before = rng.random(50)
    after = before + 0.1 + rng.normal(0, 0.01, 50)  # every pair moves by about 0.1, the spread is 0.3
    first, again = paired_bootstrap(before, after, seed=7), paired_bootstrap(before, after, seed=7)
    assert first == again
    assert paired_bootstrap(before, after, seed=8)["low"] != first["low"]
    assert 0.09 < first["low"] < first["delta"] < first["high"] < 0.11  # unpaired, it would be ~10x wider


def test_the_perplexity_statistic_pools_nll_over_tokens() -> None:
    before = [(2.0, 1), (6.0, 3)]  # mean NLL 2 in both windows
    after = [(1.0, 1), (3.0, 3)]
    change = paired_bootstrap(before, after, pooled_perplexity, resamples=200)
    assert change["before"] == pytest.approx(math.exp(2)) and change["after"] == pytest.approx(math.exp(1))
    assert change["low"] == pytest.approx(math.e - math.exp(2)) == change["high"]
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([1, 2], [1, 2, 3])


# --- measuring and comparing ---------------------------------------------------------------------------


def test_probe_perplexity_scores_each_window_on_its_own(files: dict) -> None:
    model = AutoModelForCausalLM.from_pretrained(files["model"]).eval()
    probe = Book("p", files["p1"], torch.arange(10) + 40)
    result = forgetting.probe_perplexity(model, [probe], window=4, progress=False)
    assert [row["tokens"] for row in result["records"]] == [3, 3, 1]  # 4 + 4 + 2 tokens
    for row, piece in zip(result["records"], probe.token_ids.split(4), strict=True):
        with torch.no_grad():
            expected = token_nll(model(input_ids=piece[None]).logits, piece[None]).sum().item()
        assert row["nll_sum"] == pytest.approx(expected, rel=1e-5)
    total = sum(row["nll_sum"] for row in result["records"])
    assert result["ppl"] == pytest.approx(math.exp(total / 7)) == result["probes"]["p"]["ppl"]
    assert result["tokens"] == 7 and result["windows"] == 3


def measured(correct: list[bool], subjects: list[str], windows: list[tuple[float, int]]) -> dict:
    records = [{"subject": s, "index": i, "correct": c} for i, (s, c) in enumerate(zip(subjects, correct, strict=True))]
    return {
        "mmlu": {"records": records, **mmlu.summarize(records)},
        "perplexity": {
            "probes": {"p": {}},
            "records": [{"probe": "p", "nll_sum": nll, "tokens": tokens} for nll, tokens in windows],
        },
    }


def test_compare_reports_the_changes_from_base_to_adapted() -> None:
    subjects = ["a", "a", "b", "b"]
    base = measured([True, False, True, True], subjects, [(4.0, 2), (4.0, 2)])
    adapted = measured([True, True, False, True], subjects, [(2.0, 2), (2.0, 2)])
    deltas = forgetting.compare(base, adapted, resamples=300)
    assert deltas["mmlu_micro_accuracy"]["delta"] == 0.0 and deltas["mmlu_micro_accuracy"]["before"] == 0.75
    assert deltas["mmlu_macro_accuracy"] == pytest.approx((1 + 0.5) / 2 - (0.5 + 1) / 2)
    assert deltas["ppl"]["delta"] == pytest.approx(math.e - math.exp(2))
    assert deltas["ppl_per_probe"]["p"] == deltas["ppl"]
    other = measured([True, True, False, True], ["a", "a", "b", "c"], [(2.0, 2), (2.0, 2)])
    with pytest.raises(ValueError, match="other questions"):
        forgetting.compare(base, other)


def test_compare_and_the_summary_without_mmlu_give_the_perplexity_only() -> None:
    base = measured([True], ["a"], [(4.0, 2), (4.0, 2)])
    adapted = measured([True], ["a"], [(2.0, 2), (2.0, 2)])
    del base["mmlu"], adapted["mmlu"]
    deltas = forgetting.compare(base, adapted, resamples=300)
    assert set(deltas) == {"ppl", "ppl_per_probe"}
    assert deltas["ppl"]["delta"] == pytest.approx(math.e - math.exp(2))
    assert deltas["ppl_per_probe"]["p"] == deltas["ppl"]
    with pytest.raises(ValueError, match="only one of the base and adapted results holds MMLU"):
        forgetting.compare(measured([True], ["a"], [(4.0, 2)]), adapted)
    book, training = {"name": "b"}, {"tokens_scored": 63, "online_ppl": 9.0}
    summary = forgetting.format_summary(
        {"config": {"method": "lora"}, "book": book, "training": training, "deltas": deltas, "adapted": adapted}
    )
    assert "MMLU" not in summary and summary.splitlines()[0].startswith("lora on b (63 tokens")
    assert [row.split()[2] for row in summary.splitlines()[1:]] == ["(pooled)", "p"]  # "probe PPL NAME ..."


@pytest.mark.parametrize("method", ["locas", "lora"])
def test_evaluate_forgetting_measures_with_and_without_and_gives_the_model_back(
    files: dict, tmp_path: Path, method: str, monkeypatch
) -> None:
    model = AutoModelForCausalLM.from_pretrained(files["model"]).eval()
    tokenizer = tiny_tokenizer()
    weights = {name: p.detach().clone() for name, p in model.state_dict().items()}
    book = read_book(files["book"], tokenizer, 64, 16)
    probes = [read_book(files[name], tokenizer, 40, 2) for name in ("p1", "p2")]
    subjects = mmlu.load_mmlu(files["mmlu"], shots=1)
    config = OnlineConfig(method=method, chunk_size=16, context_window=32, width=8, lora_rank=4, lr=0.05)
    options = {"probe_window": 16, "resamples": 300, "progress": False, "state_path": tmp_path / "state.pt"}
    results = forgetting.evaluate_forgetting(model, tokenizer, book, config, subjects, probes, **options)

    base = forgetting.measure(model, tokenizer, subjects, probes, probe_window=16, progress=False)
    assert results["base"]["perplexity"]["ppl"] == pytest.approx(base["perplexity"]["ppl"], rel=1e-6)
    assert model.state_dict().keys() == weights.keys()  # no adapter or hook left behind
    assert all(torch.equal(model.state_dict()[name], value) for name, value in weights.items())
    adapted_ppl = results["adapted"]["perplexity"]["ppl"]
    assert adapted_ppl != pytest.approx(base["perplexity"]["ppl"], rel=1e-4)  # the memory was on
    deltas = results["deltas"]
    assert deltas["ppl"]["delta"] == pytest.approx(adapted_ppl - base["perplexity"]["ppl"], rel=1e-6)
    assert deltas["ppl"]["low"] <= deltas["ppl"]["delta"] <= deltas["ppl"]["high"]
    assert set(deltas["ppl_per_probe"]) == {"p1", "p2"} and results["adapted"]["mmlu"]["questions"] == 6
    assert results["config"]["method"] == method and results["training"]["tokens_scored"] == 63

    # The training finished in the state file: a second run loads it instead of training, and agrees.
    monkeypatch.setattr(online, "train_chunk", lambda *a, **k: pytest.fail("trained again"))
    again = forgetting.evaluate_forgetting(model, tokenizer, book, config, subjects, probes, base=base, **options)
    assert again["adapted"]["perplexity"]["ppl"] == pytest.approx(adapted_ppl, rel=1e-6)


def test_evaluate_forgetting_with_no_subjects_measures_the_probes_only(files: dict, monkeypatch) -> None:
    monkeypatch.setattr(forgetting, "score_mmlu", lambda *a, **k: pytest.fail("MMLU was scored"))
    model = AutoModelForCausalLM.from_pretrained(files["model"]).eval()
    tokenizer = tiny_tokenizer()
    book = read_book(files["book"], tokenizer, 64, 16)
    probes = [read_book(files[name], tokenizer, 40, 2) for name in ("p1", "p2")]
    config = OnlineConfig(method="lora", chunk_size=16, context_window=32, lora_rank=4, lr=0.05)
    results = forgetting.evaluate_forgetting(
        model, tokenizer, book, config, [], probes, probe_window=16, resamples=300, progress=False
    )
    assert set(results["base"]) == set(results["adapted"]) == {"perplexity"}
    assert set(results["deltas"]) == {"ppl", "ppl_per_probe"}
    assert set(results["deltas"]["ppl_per_probe"]) == {"p1", "p2"}
    base_ppl, adapted_ppl = results["base"]["perplexity"]["ppl"], results["adapted"]["perplexity"]["ppl"]
    assert adapted_ppl != pytest.approx(base_ppl, rel=1e-4)  # the adapter was on
    assert results["deltas"]["ppl"]["delta"] == pytest.approx(adapted_ppl - base_ppl, rel=1e-6)


# --- the command ---------------------------------------------------------------------------------------


def test_eval_forgetting_writes_both_measurements_and_the_changes(
    files: dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    out = tmp_path / "results.json"
    argv = ["eval", "forgetting", files["book"], "--model", files["model"], "--method", "locas", *TRAINER]
    argv += ["--mmlu", files["mmlu"], "--probe", files["p1"], files["p2"], *PROBES, "--lr", "0.05", "--out", out]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    results = json.loads(out.read_text(encoding="utf-8"))
    assert results["config"]["method"] == "locas" and results["config"]["width"] == 8
    assert results["config"]["lr"] == 0.05 and results["settings"]["probe_tokens"] == 40
    assert results["base"]["mmlu"]["questions"] == results["adapted"]["mmlu"]["questions"] == 6
    assert results["base"]["perplexity"]["tokens"] == 2 * (15 + 15 + 7)  # 40 tokens in windows of 16, per probe
    deltas = results["deltas"]
    assert deltas["ppl"]["after"] == pytest.approx(results["adapted"]["perplexity"]["ppl"])
    assert deltas["mmlu_micro_accuracy"]["before"] == pytest.approx(results["base"]["mmlu"]["micro_accuracy"])
    assert "MMLU accuracy (6 q.)" in stdout and "probe PPL p2" in stdout and f"wrote {out}" in stdout
    assert out.with_suffix(".state.pt").exists()

    code, _, err = run(capsys, *argv)  # the finished training is reused: the same numbers
    assert code == 0, err
    assert f"finished earlier, read from {out.with_suffix('.state.pt')}\n" in err
    assert json.loads(out.read_text(encoding="utf-8"))["deltas"] == deltas

    measured = []
    monkeypatch.setattr(forgetting, "measure", lambda *a, **k: measured.append(a) or pytest.fail("measured"))
    code, _, err = run(capsys, *argv, "--lr", "0.01")  # other settings than the saved training's
    assert code == 2 and measured == []  # refused before the probes and MMLU were scored
    error_line(err, "eval forgetting", "used other settings (--lr 0.05 -> 0.01)")


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--probe", "{book}"], ["is the book itself"]),
        (["--probe", "{tmp}/missing.txt"], ["missing.txt", "does not exist"]),
        (["--probe", "{p1}", "{tmp}/p1.txt"], ["have the same name"]),
        (["--max-tokens", "8"], ["--max-tokens 8 is less than one chunk (--chunk-size 16)"]),
        (["--context-window", "8"], ["--chunk-size 16 is larger than --context-window 8"]),
        (["--mmlu", "{tmp}"], ["has no test/ folder"]),
        (["--mmlu", "{tmp}/nowhere"], ["MMLU folder", "nowhere' does not exist"]),
        (["--mmlu", "{tmp}/p1.txt"], ["MMLU folder", "p1.txt' is a file, not a folder"]),
        (["--subjects", "botany"], ["unknown MMLU subject 'botany'"]),
        (["--out", "{tmp}/r.txt"], ["should end in .json"]),
        (["--out", "{tmp}"], ["is a folder; name a file in it, e.g. --out", "/results.json"]),
    ],
)
def test_eval_forgetting_refusals_are_one_line_before_the_model_loads(
    files: dict, tmp_path: Path, flags: list[str], fragments: list[str], monkeypatch, capsys
) -> None:
    monkeypatch.setattr(locas.default_model, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "p1.txt").write_text(TEXT, encoding="utf-8")
    flags = [flag.format(tmp=tmp_path, book=files["book"], p1=files["p1"]) for flag in flags]
    probes = [] if "--probe" in flags else ["--probe", files["p1"]]  # the case's own probes only
    argv = ["eval", "forgetting", files["book"], "--model", files["model"], "--method", "lora", *TRAINER, *PROBES]
    argv += ["--mmlu", files["mmlu"], *probes, "--out", tmp_path / "r.json", *flags]
    code, stdout, err = run(capsys, *argv)
    assert code == 2 and stdout == ""
    error_line(err, "eval forgetting", *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p1.txt"]


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--method", "none"], ["argument --method", "invalid choice"]),
        (["--probe-tokens", "1"], ["argument --probe-tokens", "at least 2"]),
        (["--shots", "-2"], ["argument --shots", "must be >= 0"]),
    ],
)
def test_eval_forgetting_bad_flags_are_usage_errors(files: dict, tmp_path: Path, flags, fragments, capsys) -> None:
    argv = ["eval", "forgetting", files["book"], "--method", "locas", "--mmlu", files["mmlu"], "--probe", files["p1"]]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "r.json", *flags)
    assert code == 2
    usage_error(err, "eval forgetting", *fragments)


def test_eval_forgetting_no_mmlu_measures_the_probes_without_an_mmlu_folder(
    files: dict, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "results.json"
    argv = ["eval", "forgetting", files["book"], "--model", files["model"], "--method", "lora", *TRAINER, *PROBES]
    argv += ["--probe", files["p1"], files["p2"], "--lr", "0.05", "--out", out]
    code, stdout, err = run(capsys, *argv)  # neither --mmlu nor --no-mmlu
    assert code == 2 and stdout == ""
    error_line(err, "eval forgetting", "no MMLU folder", "--mmlu DIR", "--no-mmlu")

    code, stdout, err = run(capsys, *argv, "--no-mmlu", "--mmlu", tmp_path / "missing")  # --mmlu is not read
    assert code == 0, err
    results = json.loads(out.read_text(encoding="utf-8"))
    assert "mmlu" not in results["base"] and "mmlu" not in results["adapted"]
    assert set(results["deltas"]) == {"ppl", "ppl_per_probe"}
    assert results["settings"]["mmlu"] is None and results["settings"]["shots"] is None
    assert results["deltas"]["ppl"]["after"] == pytest.approx(results["adapted"]["perplexity"]["ppl"])
    assert "MMLU" not in stdout and "probe PPL (pooled)" in stdout and "probe PPL p2" in stdout


# --- benchmarks/forgetting_embedded.py -----------------------------------------------------------------


def load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "forgetting_embedded.py"
    spec = importlib.util.spec_from_file_location("forgetting_embedded", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_without_mmlu_plots_the_perplexity_only_and_refuses_other_settings(
    files: dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    benchmark = load_benchmark()
    model = AutoModelForCausalLM.from_pretrained(files["model"]).eval()
    monkeypatch.setattr(benchmark, "load_model", lambda: (model, tiny_tokenizer()))
    panels = []

    def save_figure(figure, path: Path) -> Path:
        panels.append(len(figure.axes))
        return pg19.save_figure(figure, path)

    monkeypatch.setattr(benchmark, "save_figure", save_figure)
    out = tmp_path / "out"
    argv = ["--pg19", str(files["book"].parent), "--mmlu", str(tmp_path / "missing"), "--book", "book"]
    argv += ["--probes", "p1", "p2", "--max-tokens", "64", "--chunk-size", "16", "--context-window", "32"]
    argv += ["--probe-tokens", "40", "--probe-window", "16", "--methods", "lora", "--out", str(out)]
    assert benchmark.main([*argv, "--no-mmlu"]) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert "mmlu" not in results["base"] and set(results["methods"]["lora"]["deltas"]) == {"ppl", "ppl_per_probe"}
    assert results["settings"]["no_mmlu"] is True and results["settings"]["mmlu"] is None
    assert panels == [1] and (out / "forgetting.png").exists()
    assert "MMLU" not in capsys.readouterr().out

    with pytest.raises(ValueError, match="other settings"):  # the same folder with MMLU
        benchmark.main(argv)
    monkeypatch.setattr(online, "train_chunk", lambda *a, **k: pytest.fail("trained again"))
    assert benchmark.main([*argv, "--no-mmlu"]) == 0  # resumed: everything was finished
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["methods"] == results["methods"]
