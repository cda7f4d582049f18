"""`locas eval locomo` end to end on a tiny local model and a tiny LoCoMo-format file: results, chart,
printed tables, memories reused by a later run, one clear line per bad input, Ctrl-C."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cli_fixtures import save_tiny_model, tiny_tokenizer
from test_cli import error_line, run, usage_error
from test_locomo import synthetic
from test_pg19 import run_quietly
from transformers import AutoTokenizer

import locas.default_model
from locas.evaluation import locomo
from locas.memory import Memory
from locas.training import online

pytestmark = pytest.mark.usefixtures("offline", "one_thread")

TINY = ["--chunk-size", "48", "--context-window", "48", "--width", "4", "--lora-rank", "4", "--lr", "1e-2"]
TINY += ["--max-new-tokens", "6", "--prompt-window", "512"]  # the tiny model's 256 positions hold no prompt
METHODS = ["--method", "none", "--method", "full", "--method", "locas", "--method", "lora", "--with-context"]
CONDITIONS = ["none", "full", "locas", "locas+full", "lora", "lora+full"]
CATEGORY_NAMES = ("single-hop", "multi-hop", "open-domain", "temporal", "adversarial", "adversarial_official")


def write_data(path: Path, conversations: list[dict]) -> Path:
    path.write_text(json.dumps(conversations), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model and a LoCoMo file of two conversations: conv-a (5 questions, categories 4 2 1 3 5) and
    conv-b (3 questions, categories 4 2 1)."""
    root = tmp_path_factory.mktemp("locomo")
    short = synthetic("conv-b")
    short["qa"] = short["qa"][:3]
    return {
        "model": save_tiny_model(root / "model", tiny_tokenizer(), hidden_size=32, seed=0),
        "data": write_data(root / "locomo.json", [synthetic("conv-a"), short]),
    }


@pytest.fixture(scope="module")
def full_run(files: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every condition on both conversations: its argv, output folder, stdout and results."""
    out = tmp_path_factory.mktemp("full") / "run"
    argv = ["eval", "locomo", files["data"], "--model", files["model"], *METHODS, *TINY, "--out", out]
    code, stdout = run_quietly(*argv)
    assert code == 0, stdout
    return {"argv": argv, "out": out, "stdout": stdout, "results": json.loads((out / "results.json").read_text())}


# --- runs ----------------------------------------------------------------------------------------------


def test_every_condition_writes_results_a_chart_memories_and_tables(files: dict, full_run: dict) -> None:
    results, out, stdout = full_run["results"], full_run["out"], full_run["stdout"]
    assert results["conditions"] == CONDITIONS  # --with-context added each twin after its condition
    settings = results["settings"]
    keys = ("data", "context_mode", "model", "dtype", "weights_dtype", "device", "world_size")
    assert {key: settings[key] for key in keys} == {
        "data": str(files["data"]),
        "context_mode": "date_split",
        "model": str(files["model"]),
        "dtype": "auto",
        "weights_dtype": "float32",
        "device": "cpu",
        "world_size": 1,
    }
    assert (settings["qa"]["max_new_tokens"], settings["qa"]["prompt_window"]) == (6, 512)
    assert list(settings["training"]) == ["locas", "lora"]
    assert (settings["training"]["locas"]["width"], settings["training"]["lora"]["lora_rank"]) == (4, 4)
    assert settings["training"]["lora"]["lr"] == 1e-2

    assert list(results["scores"]) == CONDITIONS
    for scores in results["scores"].values():
        assert set(CATEGORY_NAMES) | {"overall", "overall_official", "questions"} == set(scores)
        assert scores["questions"] == 8 and -1 <= scores["adversarial"] <= 0
    assert list(results["per_conversation"]) == ["conv-a", "conv-b"]
    assert results["per_conversation"]["conv-b"]["locas"]["questions"] == 3
    assert "adversarial" not in results["per_conversation"]["conv-b"]["locas"]
    assert len(results["predictions"]) == 8 * len(CONDITIONS)
    for info in results["conversations"].values():
        assert info["conditions"]["none"]["context_tokens"] == 0
        assert info["conditions"]["lora+full"]["context_tokens"] == info["dialogue_tokens"]  # it fits the window
        assert [info["training"][m]["loaded"] for m in ("locas", "lora")] == [False, False]

    assert (out / "locomo.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert Memory.load(out / "memories/conv-b.safetensors").width == 4
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["conv-a.pt", "conv-b.pt"]
    assert not list(out.rglob("*partial*"))

    lines = stdout.splitlines()
    header = "condition single-hop multi-hop open-domain temporal adv -F1 adv official overall overall off. questions"
    assert lines[0].split() == header.split()
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:7]}
    for condition, scores in results["scores"].items():
        expected = [f"{100 * scores[key]:.1f}" for key in (*CATEGORY_NAMES, "overall", "overall_official")]
        assert rows[condition] == [*expected, "8"]
    assert any(line.startswith("conv-b lora+full ") and line.endswith(" 3") for line in lines)
    assert "conv-a: " in stdout and "trained locas " in stdout and "answered none " in stdout
    assert lines[-1] == f"wrote {out / 'results.json'} and {out / 'locomo.png'}"


def test_a_later_run_reuses_the_memories_and_selects_conversations_and_questions(
    full_run: dict, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(locomo, "run_online", lambda *a, **k: pytest.fail("trained again"))
    selection = ["--conversations", "conv-b,0", "--categories", "4,2", "--max-questions", "1"]
    # --ttt-loss is --loss: the same settings, so the saved memories and adapters are used
    code, stdout, _ = run(capsys, *full_run["argv"], *selection, "--ttt-loss", "ntp", "--prompt-window", "300")
    assert code == 0
    results = json.loads((full_run["out"] / "results.json").read_text())
    assert list(results["per_conversation"]) == ["conv-b", "conv-a"]
    assert [r["category"] for r in results["predictions"] if r["condition"] == "locas"] == [4, 4]
    for info in results["conversations"].values():
        assert info["training"]["locas"]["loaded"] and info["training"]["lora"]["loaded"]
        assert 0 < info["conditions"]["full"]["context_tokens"] < info["dialogue_tokens"]  # cut to fit 300
    assert "trained locas 0.0s (loaded), lora 0.0s (loaded)" in stdout


def test_ttt_loss_grpo_trains_the_memory_on_recall_of_the_dialogue_alone(
    files: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    train, chunks = online.grpo_train_chunk, []

    def recording(locas_model, optimizer, chunk_ids, tokenizer, *args, **kwargs):
        chunks.append(chunk_ids.tolist())
        return train(locas_model, optimizer, chunk_ids, tokenizer, *args, **kwargs)

    monkeypatch.setattr(online, "grpo_train_chunk", recording)
    out = tmp_path / "run"
    argv = ["eval", "locomo", files["data"], "--model", files["model"], "--method", "locas", "--conversations", "0"]
    grpo = ["--ttt-loss", "grpo", "--grpo-prompt-tokens", "12", "--grpo-continuation-tokens", "4"]
    grpo += ["--grpo-max-new-tokens", "4", "--grpo-group-size", "2", "--grpo-prompts-per-chunk", "2"]
    code, stdout, err = run(capsys, *argv, *TINY, *grpo, "--out", out)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    training = results["settings"]["training"]["locas"]
    assert (training["loss"], training["steps_per_chunk"], training["grpo_prompt_tokens"]) == ("grpo", 0, 12)
    assert results["scores"]["locas"]["questions"] == 5
    # Every chunk GRPO saw, in order, makes up the rendered dialogue: the prompts never hold a question.
    conversation = locomo.load_locomo(files["data"], ["conv-a"])[0]
    tokenizer = AutoTokenizer.from_pretrained(files["model"])
    dialogue = tokenizer(locomo.render_dialogue(conversation), add_special_tokens=False).input_ids
    assert len(chunks) > 1 and [token for chunk in chunks for token in chunk] == dialogue
    assert Memory.load(out / "memories/conv-a.safetensors").metadata["online_config"]["loss"] == "grpo"


def test_ctrl_c_exits_130_and_keeps_the_memories_trained_so_far(
    files: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    train = locomo.run_online

    def interrupted_lora(model, token_ids, config, **options):
        if config.method == "lora":
            raise KeyboardInterrupt
        return train(model, token_ids, config, **options)

    monkeypatch.setattr(locomo, "run_online", interrupted_lora)
    out = tmp_path / "run"
    argv = ["eval", "locomo", files["data"], "--model", files["model"], "--method", "locas", "--method", "lora"]
    code, stdout, err = run(capsys, *argv, *TINY, "--out", out)
    assert code == 130 and stdout == ""
    assert err.strip().splitlines()[-1] == (
        "locas eval locomo: interrupted; the memories and adapters of the conversations finished so far are in "
        f"{out / 'memories'} and {out / 'adapters'}; run the same command to reuse them"
    )
    assert [p.name for p in (out / "memories").iterdir()] == ["conv-a.safetensors"]
    assert not (out / "results.json").exists() and not (out / "adapters").exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_share_the_conversations_and_give_the_answers_of_one(full_run: dict, tmp_path: Path) -> None:
    argv = [str(arg) for arg in full_run["argv"][:-1]] + [str(tmp_path / "two")]  # conv-b goes to rank 1
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launcher += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.run(
        [*launcher, "-m", "locas", *argv], capture_output=True, text=True, timeout=300, env=environment, check=False
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stdout.count("wrote ") == 1  # rank 0 alone prints and writes the results
    one, two = full_run["results"], json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["settings"]["world_size"] == 2
    assert list(two["per_conversation"]) == ["conv-a", "conv-b"]
    assert [r["prediction"] for r in two["predictions"]] == [r["prediction"] for r in one["predictions"]]
    assert two["scores"] == one["scores"]


# --- bad input: one line, exit 2, before the model loads -----------------------------------------------


def ten_conversations() -> list[dict]:
    """The official number of conversations, so the official category counts are checked (and fail)."""
    return [synthetic(f"conv-{i}") for i in range(10)]


@pytest.mark.parametrize(
    ("data", "flags", "fragments"),
    [
        ("{missing}", [], ["{missing}", "does not exist"]),
        ("{folder}", [], ["LoCoMo path", "is a folder; pass the JSON file in it"]),
        ("{not_json}", [], ["{not_json}", "not a JSON file"]),
        ("{ten}", [], ["{ten}", "category 4 (single-hop): expected 841, found 10", "use the original locomo10.json"]),
        ("{data}", ["--method", "locas+none"], ["unknown condition 'locas+none'", "none, full, locas"]),
        ("{data}", ["--method", "none"], ["condition 'none' is given twice"]),
        ("{data}", ["--conversations", "2"], ["--conversations '2'", "has 2 conversations, indices 0-1", "conv-b"]),
        ("{data}", ["--conversations", "conv-z"], ["--conversations 'conv-z'"]),
        ("{data}", ["--conversations", "0,conv-a"], ["conversation conv-a is given twice"]),
        ("{data}", ["--conversations", "1", "--categories", "3,5"], ["--categories selects no question"]),
        ("{data}", ["--context-window", "8"], ["--chunk-size 48 is larger than --context-window 8"]),
        ("{data}", ["--method", "lora", "--ttt-loss", "grpo"], ["loss 'grpo' trains a Locas memory", "not a LoRA"]),
        ("{data}", ["--out", "{file}"], ["is a file; name a folder"]),
        ("{data}", ["--out", "{no_folder}"], ["does not exist; create it first"]),
    ],
)
def test_refusals_are_one_line_before_the_model_loads(
    files: dict, tmp_path: Path, data: str, flags: list[str], fragments: list[str], monkeypatch, capsys
) -> None:
    paths = {
        **files,
        "missing": tmp_path / "missing.json",
        "not_json": tmp_path / "locomo.txt",
        "ten": write_data(tmp_path / "ten.json", ten_conversations()),
        "file": tmp_path / "file",
        "no_folder": tmp_path / "no" / "run",
        "folder": tmp_path,
    }
    paths["not_json"].write_text("[{", encoding="utf-8")
    paths["file"].write_text("", encoding="utf-8")
    data, flags = data.format_map(paths), [flag.format_map(paths) for flag in flags]
    fragments = [fragment.format_map(paths) for fragment in fragments]
    monkeypatch.setattr(locas.default_model, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    before = sorted(tmp_path.iterdir())
    argv = ["eval", "locomo", data, "--model", files["model"], "--method", "none", "--method", "locas", *TINY]
    code, stdout, err = run(capsys, *argv, "--out", tmp_path / "run", *flags)
    assert code == 2 and stdout == ""
    error_line(err, "eval locomo", *fragments)
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--max-questions", "0"], ["argument --max-questions", "must be a positive integer"]),
        (["--categories", "6"], ["argument --categories", "categories are 1-5, got 6"]),
        (["--categories", "1,,2"], ["argument --categories", "comma-separated"]),
        (["--categories", "one"], ["argument --categories: must be an integer, got 'one'"]),
        (["--conversations", ""], ["argument --conversations", "comma-separated"]),
        (["--max-new-tokens", "0"], ["argument --max-new-tokens", "must be a positive integer"]),
        (["--prompt-window", "-5"], ["argument --prompt-window", "must be a positive integer"]),
        (["--context-mode", "session"], ["argument --context-mode", "invalid choice"]),
        (["--ttt-loss", "kl"], ["argument --loss/--ttt-loss", "invalid choice"]),
        (["--grpo-group-size", "1"], ["argument --grpo-group-size", "at least 2"]),
        (["--chunk-size", "1"], ["argument --chunk-size", "at least 2"]),
        (["--lr", "0"], ["argument --lr", "must be a positive number"]),
    ],
)
def test_bad_numbers_are_usage_errors(files: dict, tmp_path: Path, flags: list[str], fragments, capsys) -> None:
    argv = ["eval", "locomo", files["data"], "--method", "locas", "--out", tmp_path / "run"]
    code, stdout, err = run(capsys, *argv, *flags)
    assert code == 2 and stdout == ""
    usage_error(err, "eval locomo", *fragments)
    assert list(tmp_path.iterdir()) == []


def test_method_is_required(files: dict, tmp_path: Path, capsys) -> None:
    code, _, err = run(capsys, "eval", "locomo", files["data"], "--out", tmp_path / "run")
    assert code == 2
    usage_error(err, "eval locomo", "--method")
