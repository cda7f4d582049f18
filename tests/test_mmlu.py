"""MMLU: the loader's refusals, the prompt, the letter scoring (against a rigged model and a plain forward pass),
the averages, and `locas eval mmlu` end to end on a tiny model and tiny MMLU folders written here."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_fixtures import save_tiny_model, tiny_tokenizer
from conftest import tiny_model
from peft import LoraConfig, get_peft_model
from test_cli import error_line, run, usage_error
from transformers import AutoModelForCausalLM

import locas
import locas.default_model
from locas.evaluation import mmlu
from locas.evaluation.mmlu import HEADER, Question
from locas.training.config import OnlineConfig
from locas.training.online import OnlineResult, run_online, trained

pytestmark = pytest.mark.usefixtures("offline", "one_thread")

DEV = [
    ["Which is heavier?", "lead", "feather", "air", "light", 0],
    ["Which is a colour?", "dog", "red", "run", "seven", 1],
]
TEST = [
    ["What is 2+2?", "3", "4", "5", "22", 1],
    ["Which is a fruit?", "stone", "chair", "apple", "cloud", 2],
    ["Which one barks?", "cat", "fish", "bird", "dog", 3],
]


def write_csv(path: Path, rows: list[list], header: tuple | list = HEADER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_mmlu(folder: Path, subjects: tuple[str, ...] = ("zoology", "astronomy")) -> Path:
    """An MMLU folder: each subject has the 2 DEV examples and the 3 TEST questions."""
    for subject in subjects:
        write_csv(folder / "dev" / f"{subject}_dev.csv", DEV)
        write_csv(folder / "test" / f"{subject}_test.csv", TEST)
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mmlu")
    return {
        "model": save_tiny_model(root / "model", tokenizer, hidden_size=32, seed=0),
        "mmlu": write_mmlu(root / "data"),
    }


def difference(a: list[list[float]], b: list[list[float]]) -> float:
    """The largest absolute difference between two tables of log-probabilities."""
    return float(np.abs(np.array(a) - np.array(b)).max())


def load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def rigged(model, tokenizer, order: str):
    """`model` with an lm_head that ignores the hidden state: the letters of `order` win, in that order."""
    _, letters = mmlu.answer_tokens(tokenizer)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        for rank, letter in enumerate(order):
            head.bias[letters[mmlu.LETTERS.index(letter)]] = 10.0 - rank
    model.lm_head = head
    return model


# --- data ----------------------------------------------------------------------------------------------


def test_load_mmlu_sorts_subjects_and_takes_the_first_questions_and_shots(tmp_path: Path) -> None:
    folder = write_mmlu(tmp_path, ("zoology", "astronomy"))
    subjects = mmlu.load_mmlu(folder, limit_per_subject=2, shots=1)
    assert [s.name for s in subjects] == ["astronomy", "zoology"]
    assert [q.question for q in subjects[0].test] == ["What is 2+2?", "Which is a fruit?"]
    assert [q.question for q in subjects[0].dev] == ["Which is heavier?"]
    assert subjects[1].test[1] == Question("zoology", "Which is a fruit?", ("stone", "chair", "apple", "cloud"), 2)
    assert [s.name for s in mmlu.load_mmlu(folder, subjects=["zoology"], shots=0)] == ["zoology"]
    assert mmlu.load_mmlu(folder, shots=0)[0].dev == []


@pytest.mark.parametrize(
    ("header", "rows", "line", "fragment"),
    [
        (["question", "a", "b", "c", "d", "answer"], [], 1, "the header is 'question,a,b,c,d,answer'"),
        (HEADER, [TEST[0], ["Q?", "a", "b", "c", "d", 4]], 3, "the answer 4 is out of range"),
        (HEADER, [["Q?", "a", "b", "c", "d", -1]], 2, "the answer -1 is out of range"),
        (HEADER, [TEST[0], TEST[1], ["Q?", "a", "b", "c", "d", "B"]], 4, "the answer 'B' is not an integer"),
        (HEADER, [["Q?", "a", "b", "c", 1]], 2, "5 fields, expected 6"),
        # a quoted question over two lines: the bad row after it is on line 4 of the file
        (HEADER, [["Two\nlines?", "a", "b", "c", "d", 0], ["Q?", "a", "b", "c", "d", 9]], 4, "the answer 9"),
    ],
)
def test_bad_rows_are_refused_naming_the_file_and_line(tmp_path: Path, header, rows, line, fragment) -> None:
    path = write_csv(tmp_path / "test" / "x_test.csv", rows, header)
    with pytest.raises(ValueError) as error:
        mmlu.read_questions(path, "x")
    message = str(error.value)
    assert f"{path}, line {line}: " in message and fragment in message, message
    if "header" not in fragment:
        assert "answer 0-3" in message  # the fix


def test_folder_and_subject_refusals(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="has no test/ folder"):
        mmlu.load_mmlu(tmp_path)
    folder = write_mmlu(tmp_path / "data", ("zoology",))
    with pytest.raises(ValueError, match=r"unknown MMLU subject 'botany'.*e\.g\. zoology"):
        mmlu.load_mmlu(folder, subjects=["botany"])
    with pytest.raises(ValueError, match="'zoology' is given twice"):
        mmlu.load_mmlu(folder, subjects=["zoology", "zoology"], shots=2)
    with pytest.raises(ValueError, match="holds 2 examples, fewer than 3 shots"):
        mmlu.load_mmlu(folder, shots=3)
    (folder / "dev" / "zoology_dev.csv").unlink()
    with pytest.raises(FileNotFoundError, match="zoology_dev.csv does not exist"):
        mmlu.load_mmlu(folder, shots=1)
    assert mmlu.load_mmlu(folder, shots=0)[0].test  # zero-shot needs no dev file
    write_csv(folder / "test" / "zoology_test.csv", [])
    with pytest.raises(ValueError, match="holds no questions"):
        mmlu.load_mmlu(folder, shots=0)


# --- prompts -------------------------------------------------------------------------------------------


def test_prompt_matches_the_standard_format() -> None:
    question = Question("high_school_physics", "What is 2+2?", ("3", "4", "5", "22"), 1)
    example = Question("high_school_physics", "Which is heavier?", ("lead", "feather", "air", "light"), 0)
    expected = (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "Which is heavier?\nA. lead\nB. feather\nC. air\nD. light\nAnswer: A\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
    )
    assert mmlu.build_prompt(question, [example]) == expected
    assert mmlu.build_prompt(question, []) == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
    )


class LetterTokenizer:
    """Encodes each character as its code point; ' A'..' D' as one token each when `merged`."""

    def __init__(self, merged: bool, distinct: bool = True) -> None:
        self.merged, self.distinct = merged, distinct

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True):
        if self.merged and len(text) == 2 and text[0] == " ":
            return type("Encoding", (), {"input_ids": [1000 + (ord(text[1]) if self.distinct else 0)]})
        return type("Encoding", (), {"input_ids": [ord(c) for c in text]})


def test_answer_tokens_with_and_without_a_space_prefix(tokenizer) -> None:
    assert mmlu.answer_tokens(LetterTokenizer(merged=True)) == ([], [1065, 1066, 1067, 1068])
    assert mmlu.answer_tokens(LetterTokenizer(merged=False)) == ([32], [65, 66, 67, 68])
    prefix, letters = mmlu.answer_tokens(tokenizer)  # the tiny byte-level BPE has no ' A' merge
    assert [tokenizer.decode(prefix + [letter]) for letter in letters] == [" A", " B", " C", " D"]
    assert prefix != []
    with pytest.raises(ValueError, match="one distinct token per letter"):
        mmlu.answer_tokens(LetterTokenizer(merged=True, distinct=False))


# --- scoring -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["DBAC", "ACBD", "CDAB"])
def test_the_scorer_picks_the_letter_the_model_is_rigged_to_prefer(files: dict, tokenizer, order: str) -> None:
    model = rigged(load(files["model"]), tokenizer, order)
    results = mmlu.evaluate_mmlu(model, tokenizer, files["mmlu"], shots=1, subjects=["zoology"], progress=False)
    favourite = mmlu.LETTERS.index(order[0])
    assert [r["prediction"] for r in results["records"]] == [favourite] * 3
    assert [r["correct"] for r in results["records"]] == [row[5] == favourite for row in TEST]
    assert results["micro_accuracy"] == pytest.approx(sum(row[5] == favourite for row in TEST) / 3)
    logprobs = results["records"][0]["logprobs"]
    assert sorted(range(4), key=lambda i: -logprobs[i]) == [mmlu.LETTERS.index(letter) for letter in order]


@pytest.mark.parametrize("reuse_head", [True, False])
def test_logprobs_are_the_models_next_token_logprobs_after_the_prompt(files: dict, tokenizer, reuse_head) -> None:
    model = load(files["model"])
    subjects = mmlu.load_mmlu(files["mmlu"], subjects=["astronomy"], shots=2)
    results = mmlu.score_mmlu(model, tokenizer, subjects, reuse_head=reuse_head, progress=False)
    for record, question in zip(results["records"], subjects[0].test, strict=True):
        prompt = mmlu.build_prompt(question, subjects[0].dev)
        expected = []
        for letter in mmlu.LETTERS:
            ids = tokenizer(prompt + " " + letter).input_ids
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0, -1]
            expected.append(logits.log_softmax(-1)[ids[-1]].item())
        assert record["logprobs"] == pytest.approx(expected, abs=1e-4)
        assert record["prediction"] == max(range(4), key=expected.__getitem__)
        assert (record["shots"], record["truncated"]) == (2, False)


def test_shots_are_dropped_only_as_far_as_the_window_needs(files: dict, tokenizer) -> None:
    model = load(files["model"])
    subjects = mmlu.load_mmlu(files["mmlu"], subjects=["zoology"], limit_per_subject=1, shots=2)
    question, dev = subjects[0].test[0], subjects[0].dev
    prefix, _ = mmlu.answer_tokens(tokenizer)
    length = {k: len(tokenizer(mmlu.build_prompt(question, dev[:k])).input_ids + prefix) for k in (0, 1, 2)}
    assert length[0] < length[1] < length[2]
    for window, shots, truncated in [(length[2], 2, False), (length[2] - 1, 1, False), (length[1], 1, False)]:
        model.config.max_position_embeddings = window  # the default window is the model's
        record = mmlu.score_mmlu(model, tokenizer, subjects, progress=False)["records"][0]
        assert (record["shots"], record["truncated"]) == (shots, truncated), window
    results = mmlu.score_mmlu(model, tokenizer, subjects, window=length[0] - 3, progress=False)
    assert (results["records"][0]["shots"], results["records"][0]["truncated"]) == (0, True)
    assert (results["fewer_shots"], results["truncated"]) == (1, 1)


def test_the_head_cache_gives_the_scores_of_whole_prompts_in_every_family(family_name: str) -> None:
    model = tiny_model(family_name)  # vocabulary 128: the ASCII code points of LetterTokenizer
    dev, test = ([Question("zoology", row[0], tuple(row[1:5]), row[5]) for row in rows] for rows in (DEV[:1], TEST))
    tokenizer = LetterTokenizer(merged=False)
    reused, whole = (
        mmlu.score_mmlu(model, tokenizer, [mmlu.Subject("zoology", dev, test)], reuse_head=reuse, progress=False)
        for reuse in (True, False)
    )
    assert [r["shots"] for r in reused["records"]] == [1, 1, 1]  # the head was used
    reused, whole = reused["records"], whole["records"]
    assert difference([r["logprobs"] for r in reused], [r["logprobs"] for r in whole]) < 1e-4


def test_macro_and_micro_averages() -> None:
    records = [{"subject": "a", "correct": c} for c in (True, False)] + [{"subject": "b", "correct": True}] * 3
    summary = mmlu.summarize(records)
    assert summary["micro_accuracy"] == pytest.approx(4 / 5)
    assert summary["macro_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    assert summary["subjects"]["a"] == {"questions": 2, "correct": 1, "accuracy": 0.5}
    assert (summary["questions"], summary["correct"]) == (5, 4)


def test_a_locas_model_and_a_peft_model_are_scored_with_what_they_add(files: dict, tokenizer) -> None:
    subjects = mmlu.load_mmlu(files["mmlu"], subjects=["zoology"], shots=1)
    bare = [
        r["logprobs"] for r in mmlu.score_mmlu(load(files["model"]), tokenizer, subjects, progress=False)["records"]
    ]

    def logprobs(model) -> list[list[float]]:
        return [r["logprobs"] for r in mmlu.score_mmlu(model, tokenizer, subjects, progress=False)["records"]]

    locas_model = locas.attach(load(files["model"]), width=4)  # zero values: exactly the backbone
    assert difference(logprobs(locas_model), bare) < 1e-4
    with torch.no_grad():
        locas_model.memory.down.normal_()
    assert difference(logprobs(locas_model), bare) > 1e-3

    peft_model = get_peft_model(load(files["model"]), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert difference(logprobs(peft_model), bare) < 1e-4  # B = 0 at init
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_()
    assert difference(logprobs(peft_model), bare) > 1e-3


# --- the command ---------------------------------------------------------------------------------------


def saved_results(out: Path) -> dict:
    return json.loads(out.read_text(encoding="utf-8"))


def test_eval_mmlu_writes_the_scores_of_the_library(files: dict, tokenizer, tmp_path: Path, capsys) -> None:
    out = tmp_path / "results.json"
    code, stdout, _ = run(capsys, "eval", "mmlu", files["mmlu"], "--model", files["model"], "--shots", 1, "--out", out)
    assert code == 0
    results = saved_results(out)
    expected = mmlu.evaluate_mmlu(load(files["model"]), tokenizer, files["mmlu"], shots=1, progress=False)
    assert [r["prediction"] for r in results["records"]] == [r["prediction"] for r in expected["records"]]
    assert results["micro_accuracy"] == pytest.approx(expected["micro_accuracy"])
    assert list(results["subjects"]) == ["astronomy", "zoology"] and results["questions"] == 6
    assert results["settings"]["model"] == str(files["model"]) and results["shots"] == 1
    assert "micro average (all questions)" in stdout and f"wrote {out}" in stdout

    code, _, _ = run(capsys, "eval", "mmlu", files["mmlu"], "--model", files["model"], "--subjects", "zoology")
    assert code == 2  # --out is required
    argv = ["eval", "mmlu", files["mmlu"], "--model", files["model"], "--subjects", "zoology"]
    code, _, _ = run(capsys, *argv, "--limit-per-subject", 2, "--shots", 0, "--out", out)
    assert code == 0
    assert [(r["subject"], r["index"], r["shots"]) for r in saved_results(out)["records"]] == [
        ("zoology", 0, 0),
        ("zoology", 1, 0),
    ]


def learned_files(files: dict, tokenizer, folder: Path) -> dict[str, Path]:
    """A memory file, a peft adapter folder and an eval-locomo adapter file for the tiny model (trained or
    randomised, so that each one changes the scores)."""
    model = load(files["model"])
    token_ids = tokenizer(" ".join(row[0] for row in TEST * 8), return_tensors="pt").input_ids[0]
    config = OnlineConfig(method="lora", chunk_size=16, context_window=16, lora_rank=2, lr=0.05)
    result = run_online(model, token_ids, config, progress=False)
    torch.save(
        {"online_config": dataclasses.asdict(result.config), "final_state": result.final_state}, folder / "conv.pt"
    )

    memory = locas.attach(load(files["model"]), width=4).memory
    with torch.no_grad():
        memory.down.normal_()
    memory.save(folder / "memory.safetensors")

    peft_model = get_peft_model(load(files["model"]), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_()
    peft_model.save_pretrained(folder / "adapter")
    return {"memory": folder / "memory.safetensors", "adapter": folder / "adapter", "locomo": folder / "conv.pt"}


def test_eval_mmlu_with_a_memory_or_an_adapter(files: dict, tokenizer, tmp_path: Path, capsys) -> None:
    from peft import PeftModel

    learned = learned_files(files, tokenizer, tmp_path)
    subjects = mmlu.load_mmlu(files["mmlu"], shots=1)

    def expected(kind: str) -> list[list[float]]:
        model = load(files["model"])
        if kind == "memory":
            model = locas.LocasModel(model)
            locas.load_memory(learned["memory"], model)
        elif kind == "adapter":
            model = PeftModel.from_pretrained(model, learned["adapter"])
        if kind == "locomo":
            saved = torch.load(learned["locomo"], weights_only=True)
            result = OnlineResult(OnlineConfig(**saved["online_config"]), final_state=saved["final_state"])
            with trained(model, result):
                records = mmlu.score_mmlu(model, tokenizer, subjects, progress=False)["records"]
        else:
            records = mmlu.score_mmlu(model, tokenizer, subjects, progress=False)["records"]
        return [r["logprobs"] for r in records]

    bare = expected("none")
    for kind, flag in [("memory", "--memory"), ("adapter", "--adapter"), ("locomo", "--adapter")]:
        out = tmp_path / f"{kind}.json"
        argv = ["eval", "mmlu", files["mmlu"], "--model", files["model"], "--shots", 1, flag, learned[kind]]
        code, _, err = run(capsys, *argv, "--out", out)
        assert code == 0, err
        scored = [r["logprobs"] for r in saved_results(out)["records"]]
        assert difference(scored, expected(kind)) < 1e-4, kind
        assert difference(scored, bare) > 1e-3, kind


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--out", "{tmp}/r.txt"], ["should end in .json"]),
        (["--out", "{tmp}/no/r.json"], ["does not exist; create it first"]),
        (["--subjects", "botany"], ["unknown MMLU subject 'botany'"]),
        (["--shots", "3"], ["astronomy_dev.csv holds 2 examples, fewer than 3 shots"]),
        (["--memory", "{tmp}/missing.safetensors"], ["missing.safetensors", "'locas memorize'"]),
        (["--adapter", "{tmp}"], ["has no adapter_config.json"]),
        (["--adapter", "{tmp}/missing.pt"], ["missing.pt", "cannot be read"]),
    ],
)
def test_eval_mmlu_refusals_are_one_line_before_the_model_loads(
    files: dict, tmp_path: Path, flags: list[str], fragments: list[str], monkeypatch, capsys
) -> None:
    monkeypatch.setattr(locas.default_model, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    out = [] if "--out" in flags else ["--out", tmp_path / "r.json"]
    argv = ["eval", "mmlu", files["mmlu"], "--model", files["model"], "--shots", "1"]
    code, stdout, err = run(capsys, *argv, *flags, *out)
    assert code == 2 and stdout == ""
    error_line(err, "eval mmlu", *fragments)
    assert not (tmp_path / "r.json").exists()


def test_eval_mmlu_refuses_a_bad_csv_and_a_folder_without_test(files: dict, tmp_path: Path, capsys) -> None:
    bad = write_mmlu(tmp_path / "bad", ("zoology",))
    write_csv(bad / "test" / "zoology_test.csv", [TEST[0], ["Q?", "a", "b", "c", "d", "x"]])
    code, _, err = run(capsys, "eval", "mmlu", bad, "--model", files["model"], "--out", tmp_path / "r.json")
    assert code == 2
    error_line(err, "eval mmlu", f"{bad / 'test' / 'zoology_test.csv'}, line 3", "'x' is not an integer")
    code, _, err = run(capsys, "eval", "mmlu", tmp_path, "--model", files["model"], "--out", tmp_path / "r.json")
    assert code == 2
    error_line(err, "eval mmlu", "has no test/ folder")


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--memory", "m.safetensors", "--adapter", "a"], ["--adapter", "not allowed with argument --memory"]),
        (["--shots", "-1"], ["argument --shots", "must be >= 0"]),
        (["--limit-per-subject", "0"], ["argument --limit-per-subject", "must be a positive integer"]),
    ],
)
def test_eval_mmlu_bad_flags_are_usage_errors(files: dict, tmp_path: Path, flags, fragments, capsys) -> None:
    code, _, err = run(capsys, "eval", "mmlu", files["mmlu"], *flags, "--out", tmp_path / "r.json")
    assert code == 2
    usage_error(err, "eval mmlu", *fragments)
