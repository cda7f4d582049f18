"""The `locas` command: happy paths and one clear stderr line per bad input, on tiny local model folders.

Every command runs in-process through `locas.cli.main`; the models are 2-layer random Llamas saved with a
byte-level BPE tokenizer (see cli_fixtures.py), so the whole file runs in seconds and needs no download.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from cli_fixtures import TEXT, save_tiny_model, tiny_tokenizer
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import locas.training
from locas.cli import main
from locas.memory import Memory
from locas.training import grpo

pytestmark = pytest.mark.usefixtures("offline", "one_thread")

WIDTH = 8
WINDOW = ["--window", "64"]
NLL_LINE = re.compile(r"NLL (\d+\.\d+)\s+perplexity (\d+\.\d+)\s+bits/byte (\d+\.\d+)")


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny model folders of different width, a text, and a memory for each model (made by the CLI)."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = tiny_tokenizer()
    paths = {
        "base": save_tiny_model(root / "base", tokenizer, hidden_size=32, seed=0),
        "other": save_tiny_model(root / "other", tokenizer, hidden_size=48, seed=1),
        "text": root / "text.txt",
        "memory": root / "memory.safetensors",
        "other_memory": root / "other.safetensors",
    }
    paths["text"].write_text(TEXT, encoding="utf-8")
    for model, memory, extra in [
        ("base", "memory", ["--train-steps", "3", "--lr", "0.02"]),
        ("other", "other_memory", []),
    ]:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
            code = main(
                ["memorize", str(paths["text"]), "--model", str(paths[model]), "--out", str(paths[memory])]
                + ["--width", str(WIDTH), *WINDOW, *extra]
            )
        assert code == 0, stdout.getvalue()
        paths[memory + "_stdout"] = stdout.getvalue()
    return paths


def run(capsys: pytest.CaptureFixture, *argv: str | Path) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr); argparse's SystemExit becomes its code."""
    capsys.readouterr()  # drop what the test itself printed before
    try:
        code = main([str(arg) for arg in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str, command: str, *fragments: str | Path) -> str:
    """The single stderr line `locas COMMAND: error: ...`, checked to contain every fragment."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"locas {command}: error: "), err
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    return lines[0]


def usage_error(err: str, command: str, *fragments: str) -> str:
    """A bad option's error: one `locas COMMAND: error: ... (see 'locas COMMAND --help')` line, with the fragments."""
    (line,) = err.strip().splitlines()
    assert line.startswith(f"locas {command}: error: "), err
    assert line.endswith(f"(see 'locas {command} --help')"), err
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def nll_of(out: str) -> tuple[float, float, float]:
    match = NLL_LINE.search(out)
    assert match, out
    return tuple(float(value) for value in match.groups())


# --- happy paths -----------------------------------------------------------------------------------


def test_memorize_writes_a_memory_and_the_loss_goes_down(files: dict) -> None:
    out = files["memory_stdout"]
    assert re.search(rf"memorized \d+ tokens into {WIDTH} slots x 2 layers \(highest\)", out), out
    match = re.search(r"training loss (\d+\.\d+) -> (\d+\.\d+) nats/token over 3 steps", out)
    assert match, out
    before, after = map(float, match.groups())
    assert after < before
    assert f"wrote {files['memory']}" in out
    memory = Memory.load(files["memory"])
    assert (memory.num_layers, memory.width, memory.hidden_size) == (2, WIDTH, 32)
    assert memory.metadata["train_steps"] == 3
    assert memory.down.abs().sum() > 0  # trained values
    assert [p.name for p in files["memory"].parent.iterdir() if p.name.endswith(".partial")] == []


def test_memorize_never_overwrites_a_memory(files: dict, capsys) -> None:
    before = files["memory"].read_bytes()
    code, _, err = run(capsys, "memorize", files["text"], "--model", files["base"], "--out", files["memory"])
    assert code == 2 and "exists and a memory is never overwritten" in err
    assert files["memory"].read_bytes() == before


def test_memorize_trains_the_memory_it_writes_unless_told_not_to(files: dict, tmp_path: Path, capsys) -> None:
    trained = Memory.load(files["other_memory"])  # made with no training flag
    assert (trained.metadata["train_steps"], trained.metadata["lr"], trained.metadata["loss"]) == (5, 1e-2, "ntp")
    assert trained.down.abs().sum() > 0 and "training loss" in files["other_memory_stdout"]
    out = tmp_path / "untrained.safetensors"
    argv = ["memorize", files["text"], "--model", files["base"], "--out", out, "--width", WIDTH, *WINDOW]
    code, stdout, err = run(capsys, *argv, "--train-steps", "0")
    assert code == 0, err
    assert "not trained (--train-steps 0): its values are zero" in stdout and "training loss" not in stdout
    assert Memory.load(out).down.abs().sum() == 0
    out.unlink()
    for flags, named in [
        (["--lr", "0.1"], "--lr sets"),
        (["--loss", "grpo"], "--loss sets"),
        (["--lr", "1", "--loss", "ntp"], "--loss and --lr set"),
    ]:
        code, _, err = run(capsys, *argv, "--train-steps", "0", *flags)
        assert code == 2
        flags_named = named.rsplit(" ", 1)[0]
        error_line(err, "memorize", f"{named} what --train-steps trains, and --train-steps is 0", f"drop {flags_named}")
        assert not out.exists()


def test_memorize_refuses_to_write_a_diverged_memory(files: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    def diverging(locas_model, *args, **kwargs):
        with torch.no_grad():
            locas_model.memory.down.fill_(math.nan)
        return [1.0]

    monkeypatch.setattr(locas.training, "train_on_windows", diverging)
    out = tmp_path / "m.safetensors"
    argv = ["memorize", files["text"], "--model", files["base"], "--out", out, "--width", WIDTH, *WINDOW]
    code, _, err = run(capsys, *argv, "--lr", "0.5")
    assert code == 2
    error_line(err, "memorize", "training diverged (NaN or inf in the memory) at --lr 0.5", "lower --lr")
    assert not out.exists()


def test_memorize_tau_rule_output_measures_tau_on_the_text(files: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "output.safetensors"
    argv = ["memorize", files["text"], "--model", files["base"], "--out", out, "--width", WIDTH, *WINDOW]
    code, _, err = run(capsys, *argv, "--tau-rule", "output", "--output-ratio", "0.5")
    assert code == 0, err
    memory, default = Memory.load(out), Memory.load(files["memory"])
    assert (memory.metadata["tau_rule"], memory.metadata["output_ratio"]) == ("output", 0.5)
    assert (default.metadata["tau_rule"], default.metadata["output_ratio"]) == ("output", 0.1)  # eval's default
    torch.testing.assert_close(memory.tau, default.tau * 5)  # the scale is the ratio times the measured output
    out.unlink()
    code, _, err = run(capsys, *argv, "--tau-rule", "output", "--output-ratio", "-1")
    assert code == 2 and "--output-ratio" in err
    code, _, err = run(capsys, *argv, "--tau-rule", "paper", "--output-ratio", "0.5")  # paper would ignore it
    assert code == 2 and "add --tau-rule output or drop --output-ratio" in err


GRPO_FLAGS = ["--grpo-prompt-tokens", "8", "--grpo-continuation-tokens", "4", "--grpo-max-new-tokens", "4"]
GRPO_FLAGS += ["--grpo-group-size", "3", "--grpo-prompts-per-chunk", "2"]


@pytest.mark.parametrize("loss", ["grpo", "ntp+grpo"])
def test_memorize_with_grpo_trains_recall_of_the_text(files: dict, tmp_path: Path, loss: str, monkeypatch, capsys):
    """--loss picks what --train-steps trains; GRPO's reward is a dense stand-in for token F1 here (which a
    random model almost never earns, leaving nothing to learn from), so that the memory must move."""
    rewarded = []

    def low_tokens(tokenizer):
        return lambda completion, continuation: (
            rewarded.append(continuation) or (completion < 160).float().mean().item()
        )

    monkeypatch.setattr(grpo, "recall_reward", low_tokens)
    out = tmp_path / "recall.safetensors"
    argv = ["memorize", files["text"], "--model", files["base"], "--out", out, "--width", WIDTH, *WINDOW, *GRPO_FLAGS]
    code, stdout, err = run(capsys, *argv, "--train-steps", "2", "--loss", loss, "--lr", "0.05")
    assert code == 0, err
    match = re.search(r"recall reward \(token F1, held-out prompts\) (\d\.\d{3}) -> (\d\.\d{3}) over 2 GRPO", stdout)
    assert match and all(0 <= float(value) <= 1 for value in match.groups()), stdout
    assert ("training loss" in stdout) == (loss == "ntp+grpo")  # NTP steps only with ntp+grpo
    # 2 prompts x 3 samples, sampled 4 times: the reward before, each of the 2 steps, the reward after
    assert len(rewarded) == 4 * 2 * 3 and {len(continuation) for continuation in rewarded} == {4}
    memory = Memory.load(out)
    assert memory.down.abs().sum() > 0  # trained (memorize leaves the values at 0)
    assert (memory.metadata["loss"], memory.metadata["train_steps"]) == (loss, 2)
    assert (memory.metadata["grpo"]["prompt_tokens"], memory.metadata["grpo"]["group_size"]) == (8, 3)


def test_memorize_with_grpo_refuses_a_text_shorter_than_one_recall_prompt(files: dict, tmp_path: Path, capsys):
    argv = ["memorize", files["text"], "--model", files["base"], "--out", tmp_path / "m.safetensors"]
    code, _, err = run(capsys, *argv, "--train-steps", "1", "--loss", "grpo", "--max-tokens", "20")
    assert code == 2
    error_line(err, "memorize", "the text has 20 tokens", "--grpo-prompt-tokens 64", "--grpo-continuation-tokens 16")
    assert list(tmp_path.iterdir()) == []


def test_nll_is_lower_with_the_trained_memory(files: dict, capsys) -> None:
    code, out, err = run(capsys, "nll", files["text"], "--model", files["base"], *WINDOW)
    assert code == 0 and err == "", err
    assert "no memory" in out
    base_nll, perplexity, bits_per_byte = nll_of(out)
    assert perplexity == pytest.approx(math.exp(base_nll), rel=1e-3)
    assert 0 < bits_per_byte < 20

    code, out, err = run(capsys, "nll", files["text"], "--model", files["base"], "--memory", files["memory"], *WINDOW)
    assert code == 0 and err == "", err
    assert str(files["memory"]) in out
    assert nll_of(out)[0] < base_nll


def test_export_reloads_as_a_plain_model_with_the_same_nll(files: dict, tmp_path: Path, capsys) -> None:
    exported = tmp_path / "exported"
    code, out, err = run(capsys, "export", "--model", files["base"], "--memory", files["memory"], "--out", exported)
    assert code == 0 and err == "", err
    assert "reloaded logits match" in out and f"intermediate_size {48 + WIDTH}" in out
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]  # no staging folder left
    umask = os.umask(0)
    os.umask(umask)
    assert exported.stat().st_mode & 0o777 == 0o777 & ~umask  # readable by a server of another user, as mkdir
    for written in exported.iterdir():  # safetensors writes 0600 files; open() would give 0666 & ~umask
        assert written.stat().st_mode & 0o777 == 0o666 & ~umask, written.name
    assert files["memory"].stat().st_mode & 0o777 == 0o666 & ~umask

    model = AutoModelForCausalLM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.intermediate_size == 48 + WIDTH
    assert tokenizer.decode(tokenizer("Locas clones neurons.").input_ids) == "Locas clones neurons."

    code, out, _ = run(capsys, "nll", files["text"], "--model", exported, *WINDOW)
    assert code == 0 and "no memory" in out
    dense_nll = nll_of(out)
    code, out, _ = run(capsys, "nll", files["text"], "--model", files["base"], "--memory", files["memory"], *WINDOW)
    assert code == 0
    assert f"{dense_nll[0]:.4f}" == f"{nll_of(out)[0]:.4f}"
    assert f"{dense_nll[2]:.4f}" == f"{nll_of(out)[2]:.4f}"


def test_export_in_bfloat16_checks_the_merge_in_float32(files: dict, tmp_path: Path, capsys) -> None:
    """bfloat16 logits of the memory model and the dense one differ by rounding: the per-layer check decides."""
    argv = ["export", "--model", files["base"], "--memory", files["memory"], "--dtype", "bfloat16"]
    code, out, err = run(capsys, *argv, "--out", tmp_path / "exported")
    assert code == 0 and err == "", err
    assert "each merged MLP equals MLP + memory in float32 (largest relative difference" in out
    assert "; reloaded logits differ from the memory model's by" in out and out.rstrip().endswith("(bfloat16 rounding)")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "exported").dtype == torch.bfloat16


def test_export_refuses_a_wrong_merge_and_writes_nothing(files: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    from locas import merge

    def off_by_a_little(model, memory, index=None):
        dense = right(model, memory, index)
        with torch.no_grad():
            dense.model.layers[1].mlp.down_proj.weight[:, -1] *= 1.1  # one memory slot's value
        return dense

    right = merge.to_dense
    monkeypatch.setattr(merge, "to_dense", off_by_a_little)
    argv = ["export", "--model", files["base"], "--memory", files["memory"], "--out", tmp_path / "exported"]
    code, _, err = run(capsys, *argv)
    assert code == 2
    error_line(err, "export", "the merged MLPs differ from MLP + memory by", "of their output (> 1e-4)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("with_memory", [False, True])
def test_generate_prints_a_continuation(files: dict, with_memory: bool, capsys) -> None:
    memory = ["--memory", files["memory"]] if with_memory else []
    code, out, err = run(
        capsys, "generate", "The quick brown", "--model", files["base"], "--max-new-tokens", 5, *memory
    )
    assert code == 0 and err == "", err
    assert out.endswith("\n") and len(out) > 1


def test_generate_streams_what_generate_returns_and_checks_the_length(files: dict, tmp_path: Path, capsys) -> None:
    model, tokenizer = AutoModelForCausalLM.from_pretrained(files["base"]), AutoTokenizer.from_pretrained(files["base"])
    encoded = tokenizer("The quick brown", return_tensors="pt")
    expected = model.generate(**encoded, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    code, out, _ = run(capsys, "generate", "The quick brown", "--model", files["base"], "--max-new-tokens", 12)
    assert code == 0
    assert out == tokenizer.decode(expected[0, encoded.input_ids.shape[1] :], skip_special_tokens=True) + "\n"

    code, _, err = run(capsys, "generate", "Hi", "--model", files["base"], "--max-new-tokens", 300)
    assert code == 0 and "locas generate: warning: the prompt + --max-new-tokens 300 = 302 tokens run past" in err
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    code, out, err = run(capsys, "generate", "Hi", "--model", tmp_path / "gpt2", "--max-new-tokens", 300)
    assert code == 2 and out == ""
    error_line(err, "generate", "the prompt (2 tokens) + --max-new-tokens 300 exceed", "use --max-new-tokens 254")
    code, out, err = run(capsys, "generate", "Hi " * 300, "--model", tmp_path / "gpt2", "--max-new-tokens", 1)
    assert code == 2 and out == ""
    error_line(err, "generate", "fill this model's 256 positions: nothing can follow; use a shorter prompt")


def test_python_dash_m_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "locas", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    for command in ("memorize", "nll", "generate", "export"):
        assert command in result.stdout


HEAVY_MODULES = ("torch", "transformers", "safetensors", "huggingface_hub", "peft")


def test_help_and_usage_errors_answer_before_torch_is_imported() -> None:
    """--help and a bad option are answered from the parser alone: nothing heavy is imported, so they take a
    fraction of a second (torch and transformers take seconds) and a Ctrl-C there has nothing to interrupt."""
    code = f"""
import sys
from locas.cli import main
for argv in (["--help"], ["eval", "pg19", "--help"], ["eval", "locomo", "--help"], ["memorize", "--help"],
             ["nll", "x.txt", "--window", "1"], ["eval", "pg19", "b.txt", "--out", "o.json", "--init", "no"],
             ["nll", "x.txt", "--device", "cpu", "--window", "1"]):
    try:
        main(argv)
    except SystemExit as exit:
        assert exit.code in (0, 2), (argv, exit.code)
    else:
        raise AssertionError(argv)
print(sorted({{name.split(".")[0] for name in sys.modules}} & set({HEAVY_MODULES!r})))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
    assert "locas nll: error: argument --window: must be at least 2 (tokens), got 1" in result.stderr
    assert "locas eval pg19: error: argument --init: invalid choice: 'no'" in result.stderr


def test_interrupted_while_importing_torch_is_one_line(monkeypatch, capsys) -> None:
    """Ctrl-C during the first seconds of a command (torch and transformers loading): exit 130, one line."""

    class Importing(type(sys)):
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "locas.default_model", Importing("locas.default_model"))
    code, out, err = run(capsys, "nll", "book.txt")
    assert (code, out) == (130, "")
    assert err == "locas nll: interrupted; nothing was written\n"


# --- bad input: one line on stderr, exit 2, nothing written --------------------------------------------


def test_no_command_is_a_usage_error(capsys) -> None:
    code, _, err = run(capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("locas: error: ")


@pytest.mark.parametrize("command", ["memorize", "nll"])
def test_missing_text_file(files: dict, tmp_path: Path, command: str, capsys) -> None:
    missing = tmp_path / "no-such-text.txt"
    out = ["--out", tmp_path / "m.safetensors"] if command == "memorize" else []
    code, _, err = run(capsys, command, missing, "--model", files["base"], *out)
    assert code == 2
    error_line(err, command, missing, "does not exist")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["memorize", "nll"])
def test_empty_text_file(files: dict, tmp_path: Path, command: str, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\t\n", encoding="utf-8")
    out = ["--out", tmp_path / "m.safetensors"] if command == "memorize" else []
    code, _, err = run(capsys, command, empty, "--model", files["base"], *out)
    assert code == 2
    error_line(err, command, empty, "empty")
    assert list(tmp_path.iterdir()) == [empty]


def test_text_that_is_not_utf8(files: dict, tmp_path: Path, capsys) -> None:
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    code, _, err = run(capsys, "nll", binary, "--model", files["base"])
    assert code == 2
    error_line(err, "nll", binary, "UTF-8")


def test_text_of_one_token(files: dict, tmp_path: Path, capsys) -> None:
    short = tmp_path / "short.txt"
    short.write_text("a", encoding="utf-8")
    code, _, err = run(capsys, "memorize", short, "--model", files["base"], "--out", tmp_path / "m.safetensors")
    assert code == 2
    error_line(err, "memorize", short, "fewer than 2 tokens")
    assert list(tmp_path.iterdir()) == [short]


@pytest.mark.parametrize("command", ["nll", "generate", "export"])
def test_memory_of_another_model_names_both(files: dict, tmp_path: Path, command: str, capsys) -> None:
    argv = {
        "nll": ["nll", files["text"]],
        "generate": ["generate", "Hello"],
        "export": ["export", "--out", tmp_path / "exported"],
    }[command]
    code, _, err = run(capsys, *argv, "--model", files["base"], "--memory", files["other_memory"])
    assert code == 2
    line = error_line(err, command, "made for", files["other"], files["base"], "hidden 48", "hidden 32")
    assert line.index(str(files["other"])) < line.index(str(files["base"]))  # made for OTHER, model is BASE
    assert list(tmp_path.iterdir()) == []


def test_a_memory_on_other_weights_of_its_architecture_warns_in_one_line(files: dict, tmp_path: Path, capsys) -> None:
    model = AutoModelForCausalLM.from_pretrained(files["base"])
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(1.5)
    model.save_pretrained(tmp_path / "scaled")
    AutoTokenizer.from_pretrained(files["base"]).save_pretrained(tmp_path / "scaled")
    argv = ["nll", files["text"], "--model", tmp_path / "scaled", "--memory", files["memory"], *WINDOW]
    code, stdout, err = run(capsys, *argv)
    assert code == 0 and "perplexity" in stdout
    (line,) = err.strip().splitlines()
    assert line.startswith(f"locas nll: warning: this memory was made for '{files['base']}'"), err


@pytest.mark.parametrize("command", ["nll", "generate", "export"])
def test_memory_file_that_does_not_exist(files: dict, tmp_path: Path, command: str, capsys) -> None:
    missing = tmp_path / "no-such-memory.safetensors"
    argv = {
        "nll": ["nll", files["text"]],
        "generate": ["generate", "Hello"],
        "export": ["export", "--out", tmp_path / "exported"],
    }[command]
    code, _, err = run(capsys, *argv, "--model", files["base"], "--memory", missing)
    assert code == 2
    error_line(err, command, missing, "does not exist", "locas memorize")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("random.safetensors", bytes(range(256)) * 4, "not a readable safetensors file"),
        ("notes.txt", b"just some notes\n", "not a readable safetensors file"),
        ("plain.safetensors", None, "not a locas memory"),
    ],
)
def test_file_that_is_not_a_memory(
    files: dict, tmp_path: Path, name: str, content: bytes | None, message: str, capsys
) -> None:
    path = tmp_path / name
    if content is None:
        save_file({"weight": torch.zeros(2, 2)}, str(path))  # a safetensors file, but no locas metadata
    else:
        path.write_bytes(content)
    for argv in (["nll", files["text"]], ["export", "--out", tmp_path / "exported"]):
        code, _, err = run(capsys, *argv, "--model", files["base"], "--memory", path)
        assert code == 2
        error_line(err, argv[0], path, message, "locas memorize")
    assert list(tmp_path.iterdir()) == [path]


def test_memorize_out_must_end_in_safetensors(files: dict, tmp_path: Path, capsys) -> None:
    code, _, err = run(capsys, "memorize", files["text"], "--model", files["base"], "--out", tmp_path / "memory.bin")
    assert code == 2
    error_line(err, "memorize", "memory.bin", "should end in .safetensors", "memory.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_memorize_out_in_a_missing_folder_or_on_a_folder(files: dict, tmp_path: Path, capsys) -> None:
    nested = tmp_path / "no" / "such" / "m.safetensors"
    code, _, err = run(capsys, "memorize", files["text"], "--model", files["base"], "--out", nested)
    assert code == 2
    error_line(err, "memorize", nested, "does not exist", "create it")
    folder = tmp_path / "taken.safetensors"
    folder.mkdir()
    code, _, err = run(capsys, "memorize", files["text"], "--model", files["base"], "--out", folder)
    assert code == 2
    error_line(err, "memorize", folder, "is a folder")
    assert list(tmp_path.iterdir()) == [folder] and list(folder.iterdir()) == []


def test_export_refuses_an_existing_non_empty_out(files: dict, tmp_path: Path, capsys) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    for out in (taken, a_file):
        code, _, err = run(capsys, "export", "--model", files["base"], "--memory", files["memory"], "--out", out)
        assert code == 2
        error_line(err, "export", out, "already exists", "choose a new folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "taken"]
    assert [p.name for p in taken.iterdir()] == ["keep.txt"] and a_file.read_text() == "mine"


def test_export_into_an_existing_empty_folder(files: dict, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = run(
        capsys, "export", "--model", files["base"], "--memory", files["memory"], "--out", tmp_path / "empty"
    )
    assert code == 0, err
    assert (tmp_path / "empty" / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]


def test_export_index_out_of_range(files: dict, tmp_path: Path, capsys) -> None:
    argv = ["export", "--model", files["base"], "--memory", files["memory"], "--out", tmp_path / "x", "--index"]
    for index in ("3", "-1"):  # (a negative index would pick from the end)
        code, _, err = run(capsys, *argv, index)
        assert code == 2
        error_line(err, "export", f"--index {index}:", "holds 1 memory; drop --index")
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["memorize", "nll", "generate", "export"])
def test_model_path_that_does_not_exist(files: dict, tmp_path: Path, command: str, capsys) -> None:
    missing = tmp_path / "no-such-model"
    argv = {
        "memorize": ["memorize", files["text"], "--out", tmp_path / "m.safetensors"],
        "nll": ["nll", files["text"]],
        "generate": ["generate", "Hello"],
        "export": ["export", "--memory", files["memory"], "--out", tmp_path / "exported"],
    }[command]
    code, _, err = run(capsys, *argv, "--model", missing)
    assert code == 2
    error_line(err, command, missing, "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_hub_id_that_cannot_be_found_offline(files: dict, capsys) -> None:
    code, _, err = run(capsys, "nll", files["text"], "--model", "locas-test/no-such-model")
    assert code == 2
    error_line(err, "nll", "'locas-test/no-such-model'", "nor in the Hugging Face cache", "pass a local path")


def test_a_bad_keep_freed_memory_setting_is_one_error_line(files: dict, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LOCAS_KEEP_FREED_MEMORY", "yes")
    code, out, err = run(capsys, "nll", files["text"], "--model", files["base"], "--device", "cpu")
    assert code == 2 and out == ""
    error_line(err, "nll", "LOCAS_KEEP_FREED_MEMORY='yes'", "set it to 1", "or 0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(files: dict, capsys) -> None:
    code, _, err = run(capsys, "nll", files["text"], "--model", files["base"], "--device", "cuda")
    assert code == 2
    usage_error(err, "nll", "argument --device", "CUDA is not available", "--device cpu")


def test_model_that_is_not_a_model(files: dict, tmp_path: Path, capsys) -> None:
    code, _, err = run(capsys, "nll", files["text"], "--model", files["text"])
    assert code == 2
    error_line(err, "nll", files["text"], "neither a model folder nor a .gguf file", "pass a save_pretrained folder")
    (tmp_path / "weights").mkdir()
    code, _, err = run(capsys, "nll", files["text"], "--model", tmp_path / "weights")
    assert code == 2
    error_line(err, "nll", tmp_path / "weights", "has no config.json", "not a model folder")


def test_model_folder_without_tokenizer(files: dict, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "no-tokenizer"
    AutoModelForCausalLM.from_pretrained(files["base"]).save_pretrained(folder)
    code, _, err = run(capsys, "nll", files["text"], "--model", folder)
    assert code == 2
    error_line(err, "nll", folder, "has no tokenizer files", "tokenizer.save_pretrained")


@pytest.mark.parametrize("command", ["memorize", "export"])
def test_an_output_folder_it_cannot_write_in_is_refused_before_any_work(files: dict, command: str, capsys) -> None:
    source = [files["text"]] if command == "memorize" else ["--memory", files["memory"]]
    out = "/proc/memory.safetensors" if command == "memorize" else "/proc/dense"
    code, out_text, err = run(capsys, command, *source, "--model", files["base"], "--out", out)
    assert code == 2 and out_text == ""  # nothing trained, nothing merged
    error_line(err, command, "cannot write in the folder of --out", "choose another folder")


def test_windows_past_the_models_positions(files: dict, tmp_path: Path, capsys) -> None:
    long_text = tmp_path / "long.txt"
    long_text.write_text(TEXT * 8, encoding="utf-8")
    code, _, err = run(capsys, "nll", long_text, "--model", files["base"], "--window", "300", "--max-tokens", "400")
    assert code == 0  # RoPE runs past max_position_embeddings, and is told so
    assert "locas nll: warning: --window 300: windows of 300 tokens run past the 256 positions" in err
    code, _, err = run(capsys, "nll", long_text, "--model", files["base"], "--window", "99999", "--max-tokens", "100")
    assert code == 0 and err == ""  # a window longer than the text is the text (was: a 1e12-byte allocation)

    tokenizer = tiny_tokenizer()
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    code, _, err = run(capsys, "nll", long_text, "--model", tmp_path / "gpt2", "--window", "300", "--max-tokens", "400")
    assert code == 2
    error_line(err, "nll", "--window 300: windows of 300 tokens, but this model has 256 positions; use --window 256")


def test_grpo_options_without_a_grpo_loss_are_said_to_be_ignored(files: dict, tmp_path: Path, capsys) -> None:
    argv = ["memorize", files["text"], "--model", files["base"], "--width", WIDTH, *WINDOW, "--train-steps", "1"]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "a.safetensors", "--grpo-beta", "0.5")
    assert code == 0
    assert err.splitlines()[0] == (
        "locas memorize: warning: --grpo-beta: only --loss grpo and ntp+grpo read the GRPO options; this run's "
        "loss is 'ntp', so they are ignored"
    )
    code, _, err = run(capsys, *argv, "--out", tmp_path / "b.safetensors")
    assert code == 0 and "warning" not in err


def test_scoring_a_long_text_shows_progress(files: dict, tmp_path: Path, capsys) -> None:
    long_text = tmp_path / "long.txt"
    long_text.write_text(TEXT * 8, encoding="utf-8")
    code, _, err = run(capsys, "nll", long_text, "--model", files["base"], "--window", "4", "--max-tokens", "200")
    assert code == 0 and "scoring" in err  # 50 windows in batches of 4
    code, _, err = run(capsys, "nll", long_text, "--model", files["base"], "--window", "64", "--max-tokens", "200")
    assert code == 0 and err == ""  # 4 windows: no bar


def test_width_larger_than_the_mlp(files: dict, tmp_path: Path, capsys) -> None:
    argv = ["memorize", files["text"], "--model", files["base"], "--out", tmp_path / "m.safetensors", "--width", "64"]
    code, _, err = run(capsys, *argv, *WINDOW)
    assert code == 2
    error_line(err, "memorize", "cannot clone 64 neurons from an MLP of 48; use a --width <= 48")
    assert list(tmp_path.iterdir()) == []


def test_gradient_init_on_a_gated_model(files: dict, tmp_path: Path, capsys) -> None:
    argv = ["memorize", files["text"], "--model", files["base"], "--out", tmp_path / "m.safetensors"]
    code, _, err = run(capsys, *argv, "--init", "gradient", "--width", "4", *WINDOW)
    assert code == 2
    error_line(err, "memorize", "--init='gradient' is for 2-layer-MLP families", "gated", "highest")
    assert list(tmp_path.iterdir()) == []


def test_generate_refuses_an_empty_prompt_and_chat_without_template(files: dict, capsys) -> None:
    code, _, err = run(capsys, "generate", "   ", "--model", files["base"])
    assert code == 2
    error_line(err, "generate", "prompt is empty")
    code, _, err = run(capsys, "generate", "Hello", "--model", files["base"], "--chat")
    assert code == 2
    error_line(err, "generate", "chat template", "drop --chat")


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--width", "0"], ["argument --width", "must be a positive integer, got 0"]),
        (["--width", "-3"], ["argument --width", "must be a positive integer"]),
        (["--width", "many"], ["argument --width: must be an integer, got 'many'"]),
        (["--lr", "fast"], ["argument --lr: must be a number, got 'fast'"]),
        (["--lr", "-1"], ["argument --lr", "must be a positive number"]),
        (["--lr", "nan"], ["argument --lr", "must be a positive number"]),
        (["--init", "biggest"], ["argument --init", "invalid choice", "'biggest'", "highest"]),
        (["--train-steps", "-1"], ["argument --train-steps", "must be >= 0"]),
        (["--window", "1"], ["argument --window", "at least 2"]),
        (["--max-tokens", "0"], ["argument --max-tokens", "at least 2"]),
        (["--dtype", "int8"], ["argument --dtype", "invalid choice"]),
        (["--device", "toaster"], ["argument --device", "'toaster'", "not a torch device"]),
        (["--loss", "sd"], ["argument --loss", "invalid choice", "'sd'", "ntp+grpo"]),
        (["--grpo-group-size", "1"], ["argument --grpo-group-size", "at least 2", "got 1"]),
        (["--grpo-clip-epsilon", "1"], ["argument --grpo-clip-epsilon", ">= 0 and < 1"]),
        (["--grpo-beta", "-0.1"], ["argument --grpo-beta", "must be a number >= 0"]),
        (["--grpo-temperature", "0"], ["argument --grpo-temperature", "must be a positive number"]),
        (["--grpo-prompt-tokens", "0"], ["argument --grpo-prompt-tokens", "must be a positive integer"]),
    ],
)
def test_bad_memorize_flags_exit_2_before_doing_anything(
    files: dict, tmp_path: Path, flags: list[str], fragments: list[str], capsys
) -> None:
    code, out, err = run(
        capsys, "memorize", files["text"], "--model", files["base"], "--out", tmp_path / "m.safetensors", *flags
    )
    assert code == 2 and out == ""
    usage_error(err, "memorize", *fragments)
    assert list(tmp_path.iterdir()) == []


def test_negative_temperature_is_refused(files: dict, capsys) -> None:
    code, out, err = run(capsys, "generate", "Hello", "--model", files["base"], "--temperature", "-1")
    assert code == 2 and out == ""
    usage_error(err, "generate", "argument --temperature", "must be a number >= 0, got -1.0")


def test_missing_required_flags(files: dict, capsys) -> None:
    code, _, err = run(capsys, "memorize", files["text"])
    assert code == 2
    usage_error(err, "memorize", "--out")
    code, _, err = run(capsys, "export", "--out", "somewhere")
    assert code == 2
    usage_error(err, "export", "--memory")
    code, _, err = run(capsys, "nll", files["text"], "--bogus")
    assert code == 2
    assert err == "locas nll: error: unrecognized arguments: --bogus (see 'locas nll --help')\n"


def test_books_may_come_after_options(capsys) -> None:
    from locas.cli import parse_arguments

    args = parse_arguments(["eval", "pg19", "a.txt", "--method", "none", "b.txt", "--out", "r.json", "c.txt"])
    assert args.books == ["a.txt", "b.txt", "c.txt"] and args.methods == ["none"] and args.out == "r.json"
    with pytest.raises(SystemExit) as refused:
        parse_arguments(["eval", "pg19", "a.txt", "--method", "none", "b.txt", "--bogus", "--out", "r.json"])
    assert refused.value.code == 2
    assert capsys.readouterr().err == (
        "locas eval pg19: error: unrecognized arguments: b.txt --bogus (see 'locas eval pg19 --help')\n"
    )
    forgetting = ["eval", "forgetting", "b.txt", "--method", "locas", "--out", "f.json", "--no-mmlu"]
    args = parse_arguments([*forgetting, "--probe", "p.txt", "--probe", "q.txt"])
    assert args.probes == ["p.txt", "q.txt"]  # (was: the last --probe only)
    with pytest.raises(SystemExit):  # only books are gathered: nll reads one text
        parse_arguments(["nll", "a.txt", "--window", "8", "b.txt"])
    assert "locas nll: error: unrecognized arguments: b.txt" in capsys.readouterr().err


# --- Ctrl-C: exit 130, nothing written ----------------------------------------------------------------


def test_interrupted_memorize_writes_nothing(files: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(locas.training, "train_on_windows", interrupted)
    out = tmp_path / "m.safetensors"
    argv = [
        "memorize",
        files["text"],
        "--model",
        files["base"],
        "--out",
        out,
        "--width",
        WIDTH,
        "--train-steps",
        "2",
        *WINDOW,
    ]
    code, _, err = run(capsys, *argv)
    assert code == 130
    assert err.strip() == "locas memorize: interrupted; nothing was written"
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_no_folder(files: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    """Ctrl-C after the checkpoint was (partly) written to the staging folder: both are gone."""
    save_pretrained = transformers.PreTrainedModel.save_pretrained

    def save_then_interrupt(self, *args, **kwargs):
        save_pretrained(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_then_interrupt)
    code, _, err = run(capsys, "export", "--model", files["base"], "--memory", files["memory"], "--out", tmp_path / "x")
    assert code == 130
    assert err.strip() == "locas export: interrupted; nothing was written"
    assert list(tmp_path.iterdir()) == []


# --- trainer presets (shared by the eval commands) -------------------------------------------------------


def trainer_configs(*flags: str) -> dict:
    """The resolved config of locas and lora that `locas eval pg19 ... FLAGS` would run."""
    from locas.cli import _online_config, build_parser
    from locas.evaluation import pg19

    argv = ["eval", "pg19", "book.txt", "--method", "locas", "--method", "lora", "--out", "r.json", *flags]
    args = build_parser().parse_args(argv)
    return pg19.method_configs(args.methods, _online_config(args))


@pytest.fixture
def default_is_not_paper(monkeypatch: pytest.MonkeyPatch) -> None:
    """A `default` preset unlike `paper` (as once the sweep has run), so that a test sees which one was used."""
    from locas.training import config as training_config

    best = {
        "locas": {**training_config.PAPER["locas"], "lr": 1e-2, "width": 128, "tau_rule": "neuron"},
        "lora": {**training_config.PAPER["lora"], "lr": 3e-4, "lora_rank": 16, "lora_targets": "q_proj,v_proj"},
    }
    monkeypatch.setitem(training_config.PRESETS, "default", best)


def test_preset_paper_gives_the_papers_settings(default_is_not_paper) -> None:
    from locas.training.config import OnlineConfig

    configs = trainer_configs("--preset", "paper")
    paper_locas = dict(lr=4e-3, steps_per_chunk=1, width=64, memory_init="highest", tau_rule="paper")
    paper_lora = dict(lr=5e-5, steps_per_chunk=2, lora_rank=64, lora_alpha=64.0, lora_targets="all")
    window = dict(chunk_size=1024, context_window=2048)
    assert configs["locas"] == OnlineConfig(method="locas", **window, **paper_locas).resolved()
    assert configs["lora"] == OnlineConfig(method="lora", **window, **paper_lora).resolved()
    assert configs["locas"].preset == configs["lora"].preset == "paper"


def test_without_a_preset_the_default_one_fills_the_options(default_is_not_paper) -> None:
    configs = trainer_configs()
    assert (configs["locas"].lr, configs["locas"].width, configs["locas"].tau_rule) == (1e-2, 128, "neuron")
    assert (configs["lora"].lr, configs["lora"].lora_rank, configs["lora"].lora_targets) == (3e-4, 16, "q_proj,v_proj")


def test_explicit_flags_win_over_the_preset(default_is_not_paper) -> None:
    configs = trainer_configs(
        "--preset", "paper", "--lr", "2e-3", "--tau-rule", "neuron", "--lora-rank", "8", "--key-lr-scale", "0.1"
    )
    assert (configs["locas"].lr, configs["locas"].tau_rule, configs["locas"].width) == (2e-3, "neuron", 64)
    assert configs["locas"].key_lr_scale == 0.1 and trainer_configs()["locas"].key_lr_scale == 1.0
    assert (configs["lora"].lr, configs["lora"].lora_rank, configs["lora"].steps_per_chunk) == (2e-3, 8, 2)
    configs = trainer_configs("--width", "64", "--lora-targets", "all")  # a flag equal to paper's still wins
    assert (configs["locas"].width, configs["locas"].lr, configs["lora"].lora_targets) == (64, 1e-2, "all")
    configs = trainer_configs("--tau-rule", "output", "--output-ratio", "0.25", "--top-layers", "0.5")
    assert (configs["locas"].tau_rule, configs["locas"].output_ratio, configs["locas"].top_layers) == (
        "output",
        0.25,
        0.5,
    )


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--preset", "best"], ["argument --preset", "invalid choice: 'best'", "paper", "default"]),
        (["--tau-rule", "slot"], ["argument --tau-rule", "invalid choice: 'slot'", "neuron"]),
        (["--output-ratio", "0"], ["argument --output-ratio", "0"]),
        (["--top-layers", "1.5"], ["argument --top-layers", "at most 1, got 1.5"]),
    ],
)
def test_unknown_preset_or_tau_rule_is_refused(tmp_path: Path, flags: list[str], fragments: list[str], capsys) -> None:
    book = tmp_path / "book.txt"
    book.write_text(TEXT, encoding="utf-8")
    code, out, err = run(capsys, "eval", "pg19", book, "--method", "locas", "--out", tmp_path / "r.json", *flags)
    assert code == 2 and out == ""
    usage_error(err, "eval pg19", *fragments)


def test_an_output_ratio_the_tau_rule_would_ignore_is_refused(tmp_path: Path, capsys) -> None:
    book = tmp_path / "book.txt"
    book.write_text(TEXT, encoding="utf-8")
    argv = ["eval", "pg19", book, "--method", "locas", "--out", tmp_path / "r.json", "--output-ratio", "0.2"]
    code, out, err = run(capsys, *argv, "--preset", "paper")
    assert code == 2 and out == ""
    assert "the tau rule here is 'paper': add --tau-rule output or drop --output-ratio" in err
    assert not (tmp_path / "r.json").exists()
