import pytest
import torch
from conftest import tiny_model
from test_model import with_random_values
from transformers import AutoModelForCausalLM

import locas


def test_dense_checkpoint_reloads_with_the_memory_models_logits(family_name, tokens, tmp_path):
    model = tiny_model(family_name)
    locas_model = locas.attach(model, width=4)
    memory = with_random_values(locas_model, width=6)
    locas_model.attach_memory(memory)
    with torch.no_grad():
        expected = locas_model(tokens).logits
        assert not torch.allclose(expected, locas_model.detach()(tokens).logits, atol=1e-3)
    locas_model = locas.LocasModel(model, memory=memory)
    dense = locas_model.to_dense()
    dense.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    field = locas_model.family.width_field
    assert getattr(reloaded.config, field) == 48 + 6
    for mlp in locas_model.family.mlps(reloaded):
        assert locas_model.family.read(mlp).up.shape == (54, 32)
    with torch.no_grad():
        assert (reloaded(tokens).logits - expected).abs().max() < 1e-4
        # the backbone itself is untouched by the merge
        assert torch.equal(locas_model(tokens).logits, expected)


def test_batched_memory_needs_an_index(tokens):
    locas_model = locas.attach(tiny_model("llama"), width=4)
    memory = with_random_values(locas_model, width=4, batch_size=2)
    with pytest.raises(ValueError, match=r"holds 2 sequences' memories; pass index=0\.\.1"):
        locas_model.to_dense(memory)
    dense = locas_model.to_dense(memory, index=1)
    with torch.no_grad():
        expected = locas_model.compute_nll(tokens, memory=memory.select(1))
        logits = dense(tokens).logits
    torch.testing.assert_close(locas.model.token_nll(logits, tokens), expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_merge_keeps_the_backbone_bits_and_rounds_the_memory_once():
    model = tiny_model("qwen2", dtype=torch.bfloat16)
    locas_model = locas.attach(model, width=4)
    memory = with_random_values(locas_model, width=4)
    dense = locas_model.to_dense(memory)
    assert dense.dtype == torch.bfloat16
    family = locas_model.family
    for layer, (old, new) in enumerate(zip(family.mlps(model), family.mlps(dense), strict=True)):
        old_weights, new_weights = family.read(old), family.read(new)
        assert torch.equal(new_weights.gate[:48], old_weights.gate)
        assert torch.equal(new_weights.down[:, :48], old_weights.down)
        expected_values = (memory.down[layer, 0] * memory.tau[layer, 0].unsqueeze(-1)).T.to(torch.bfloat16)
        assert torch.equal(new_weights.down[:, 48:], expected_values)


def test_merge_refuses_a_memory_of_another_model():
    locas_model = locas.attach(tiny_model("llama"), width=4)
    foreign = locas.attach(tiny_model("gpt2"), width=4).memory
    with pytest.raises(ValueError, match="made for"):
        locas_model.to_dense(foreign)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_error_is_float32_rounding_for_a_true_merge_and_large_for_a_wrong_one(family_name, tokens, dtype):
    from locas.merge import merge_error

    locas_model = locas.attach(tiny_model(family_name).to(dtype), width=4)
    memory = locas_model.attach_memory(with_random_values(locas_model, width=6))
    dense = locas_model.to_dense()
    assert merge_error(locas_model, dense, tokens, memory) < 1e-6
    with torch.no_grad():
        memory.tau.mul_(1.05)  # a merge that misses part of the scale
        wrong = locas_model.to_dense()
        memory.tau.div_(1.05)
    assert merge_error(locas_model, wrong, tokens, memory) > 1e-4
    with_fewer_layers = locas.LocasModel(locas_model.detach(), memory=memory, memory_layers=[1])
    assert merge_error(with_fewer_layers, with_fewer_layers.to_dense(), tokens, memory) < 1e-6
