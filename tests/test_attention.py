"""CPU training repeats a grouped-query layer's keys and values per query head; results stay the same."""

from __future__ import annotations

from contextlib import ExitStack, nullcontext

import pytest
import torch
from conftest import GATED
from transformers import AutoModelForCausalLM, Qwen3Config
from transformers.integrations import sdpa_attention

from locas import attention
from locas.model import LocasModel
from locas.training import online
from locas.training.config import OnlineConfig
from locas.training.offline import train_on_windows
from locas.training.online import run_online


def sdpa_model():
    torch.manual_seed(0)
    config = Qwen3Config(**GATED, head_dim=8)  # 4 query heads, 2 key/value heads
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.fixture
def key_value_heads(monkeypatch) -> list[tuple[bool, int, int]]:
    """(gradients on, query heads, key heads) of every scaled_dot_product_attention call."""
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def recorded(query, key, value, *args, **kwargs):
        calls.append((torch.is_grad_enabled(), query.shape[1], key.shape[1]))
        return original(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded)
    return calls


def test_training_forward_repeats_keys_and_values_and_scoring_does_not(key_value_heads):
    text = torch.randint(0, 128, (96,), generator=torch.Generator().manual_seed(1))
    settings = OnlineConfig(method="locas", chunk_size=32, context_window=32, width=8)
    run_online(sdpa_model(), text, settings, progress=False)
    training = {(query, key) for grad, query, key in key_value_heads if grad}
    scoring = {(query, key) for grad, query, key in key_value_heads if not grad}  # memorize's forward
    assert training == {(4, 4)}
    assert scoring == {(4, 2)}


@pytest.mark.parametrize("case", [dict(method="locas", width=8), dict(method="lora", loss="mix", lora_rank=4)])
def test_repeated_keys_and_values_give_the_same_run(monkeypatch, case):
    text = torch.randint(0, 128, (130,), generator=torch.Generator().manual_seed(2))
    settings = OnlineConfig(chunk_size=32, context_window=32, steps_per_chunk=2, teacher_window=64, **case)
    repeated = run_online(sdpa_model(), text, settings, progress=False)
    monkeypatch.setattr(online, "keys_and_values_per_query_head", lambda model: nullcontext())
    grouped = run_online(sdpa_model(), text, settings, progress=False)
    assert len(repeated.records) == 5
    for a, b in zip(repeated.records, grouped.records, strict=True):
        assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-5)


def test_offline_training_repeats_keys_and_values(key_value_heads):
    model = LocasModel(sdpa_model())
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    model.memorize(ids, keep_top=8)
    losses = train_on_windows(model, ids, torch.ones_like(ids), steps=2, progress=False)
    assert losses[1] < losses[0]
    assert {(query, key) for grad, query, key in key_value_heads if grad} == {(4, 4)}


def test_switch_is_scoped_to_cpu_eval_training_and_restored():
    model, original = sdpa_model(), sdpa_attention.use_gqa_in_sdpa
    with attention.keys_and_values_per_query_head(model):
        assert sdpa_attention.use_gqa_in_sdpa is attention._never
    assert sdpa_attention.use_gqa_in_sdpa is original
    with pytest.raises(RuntimeError), attention.keys_and_values_per_query_head(model):
        raise RuntimeError("a failed step")
    assert sdpa_attention.use_gqa_in_sdpa is original
    with torch.no_grad(), attention.keys_and_values_per_query_head(model):
        assert sdpa_attention.use_gqa_in_sdpa is original
    with attention.keys_and_values_per_query_head(model.train()):  # gradient checkpointing would recompute
        assert sdpa_attention.use_gqa_in_sdpa is original
    with attention.keys_and_values_per_query_head(sdpa_model().to("meta")):  # not a CPU
        assert sdpa_attention.use_gqa_in_sdpa is original


def test_overlapping_contexts_restore_the_original_when_the_last_closes():
    """Two threads' steps may close out of order: the first to close must not undo the other's switch."""
    model, original = sdpa_model(), sdpa_attention.use_gqa_in_sdpa
    first, second = ExitStack(), ExitStack()
    first.enter_context(attention.keys_and_values_per_query_head(model))
    second.enter_context(attention.keys_and_values_per_query_head(model))
    first.close()
    assert sdpa_attention.use_gqa_in_sdpa is attention._never
    second.close()
    assert sdpa_attention.use_gqa_in_sdpa is original
