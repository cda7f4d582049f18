"""Tiny random models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from locas.default_model import load_model

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
GATED = dict(COMMON, intermediate_size=48, num_key_value_heads=2)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**GATED),
    "qwen2": lambda: Qwen2Config(**GATED),
    "qwen3": lambda: Qwen3Config(**GATED, head_dim=8),
    "mistral": lambda: MistralConfig(**GATED),
    "gemma": lambda: GemmaConfig(**GATED, head_dim=8),
    "gemma2": lambda: Gemma2Config(**GATED, head_dim=8),
    "gemma3": lambda: Gemma3TextConfig(**GATED, head_dim=8),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256, n_inner=48),
    "gpt_neox": lambda: GPTNeoXConfig(**COMMON, intermediate_size=48),
}
GATED_FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3"]
MLP_FAMILIES = ["gpt2", "gpt_neox"]


def tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[name](), dtype=dtype, attn_implementation="eager")
    # Random init leaves biases and some norms at exactly 0/1; perturb so tests see real weights.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model.eval()


CACHE_NAME = "smollm2-135m-instruct-0.1.2"
PROMPT_IDS = torch.tensor([[1, 504, 3575, 282, 4649, 314]])  # a short arbitrary token sequence


@pytest.fixture(scope="session")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """First load of the default model into a fresh cache dir (the one slow de-quantisation)."""
    root = tmp_path_factory.mktemp("locas-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCAS_CACHE_DIR", str(root))
        assert not (root / CACHE_NAME).exists()
        start = time.perf_counter()
        model, tokenizer = load_model()
        seconds = time.perf_counter() - start
    with torch.no_grad():
        logits = model(PROMPT_IDS).logits
    return {"root": root, "model": model, "tokenizer": tokenizer, "logits": logits, "seconds": seconds}


def assert_same_values_and_gradients(function, reference, logits: torch.Tensor, *others: torch.Tensor) -> None:
    """`function(logits, *others)` equals `reference(logits, *others)` per token, in float32, and so does its
    gradient to `logits` (kept in their dtype) under a different weight per token."""
    weights = torch.rand(logits.shape[:-1], generator=torch.Generator().manual_seed(1))
    values, gradients = [], []
    for f in (function, reference):
        value = f(logits, *others)
        values.append(value)
        gradients.append(torch.autograd.grad((value * weights).sum(), logits)[0])
    assert values[0].dtype == torch.float32 and gradients[0].dtype == logits.dtype
    torch.testing.assert_close(values[0], values[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gradients[0], gradients[1])


def shared_data(*parts: str) -> Path:
    """A file from ../shared/data beside the checkout (tests read it there, never from a copy)."""
    path = Path(__file__).resolve().parents[2].joinpath("shared", "data", *parts)
    if not path.exists():
        pytest.fail(f"test data {path} is missing: the shared/ folder must sit beside the checkout")
    return path


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub lookup fails at once instead of retrying the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matrices: one thread is faster, and much faster when other processes load the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=list(TINY_CONFIGS))
def family_name(request) -> str:
    return request.param


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
