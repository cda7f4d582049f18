"""The real embedded model (SmolLM2-135M): training the memory lowers the NLL of a passage, and the
exported dense checkpoint reproduces the memory model."""

import pytest
import torch
from conftest import shared_data
from transformers import AutoModelForCausalLM

import locas
from locas.training import train_on_windows

pytestmark = pytest.mark.embedded


def test_memory_learns_a_passage_and_the_dense_export_reproduces_it(embedded, tmp_path):
    model, tokenizer = embedded["model"], embedded["tokenizer"]
    text = shared_data("pg19", "349.txt").read_text(encoding="utf-8")
    token_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, 3000:3384]

    locas_model = locas.LocasModel(model)
    try:
        memory_learns_and_merges(locas_model, token_ids, tmp_path)
    finally:
        locas_model.detach()  # the model is the session's: give it back unwrapped


def memory_learns_and_merges(locas_model, token_ids, tmp_path) -> None:
    mask = torch.ones_like(token_ids)
    memory = locas_model.memorize(token_ids, keep_top=64)
    before = locas_model.compute_nll(token_ids).mean().item()
    with locas_model.using(None):
        assert locas_model.compute_nll(token_ids).mean().item() == before  # zero values: the backbone itself
    train_on_windows(locas_model, token_ids, mask, steps=4, lr=1e-2, progress=False)
    after = locas_model.compute_nll(token_ids).mean().item()
    print(f"embedded model, 384 tokens of PG-19 book 349: NLL {before:.4f} -> {after:.4f} after 4 steps")
    assert after < before - 0.02

    dense = locas_model.to_dense(memory)
    dense.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.intermediate_size == 1536 + 64
    with torch.no_grad():
        expected = locas_model(token_ids).logits
        assert (reloaded(token_ids).logits - expected).abs().max() < 1e-4
    assert locas.model.token_nll(reloaded(token_ids).logits, token_ids).mean().item() == pytest.approx(after, abs=1e-5)
