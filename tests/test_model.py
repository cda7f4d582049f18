import copy

import pytest
import torch
from conftest import GATED_FAMILIES, assert_same_values_and_gradients, tiny_model
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, OPTConfig, OPTForCausalLM

import locas
from locas.model import LocasModel, output_scales, spread_positions, target_nll


def with_random_values(model, width=6, batch_size=1, seed=0, scale=1.0):
    """A memorized memory whose values are random (so it changes the output)."""
    memory = locas.memorize(model, torch.randint(0, 128, (1, 16)), keep_top=width, memory_init="highest")
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn((memory.num_layers, batch_size, width, memory.hidden_size), generator=generator) * scale
    return locas.Memory(
        up=memory.up.detach().expand(-1, batch_size, -1, -1),
        gate=None if memory.gate is None else memory.gate.detach().expand(-1, batch_size, -1, -1),
        down=down,
        tau=memory.tau * 50,  # big enough to move the logits visibly
        metadata=memory.metadata,
    )


def test_zero_memory_and_detach_give_backbone_logits_exactly(family_name, tokens):
    model = tiny_model(family_name)
    with torch.no_grad():
        expected = model(tokens).logits
        locas_model = locas.attach(model, width=8)
        assert torch.equal(locas_model(tokens).logits, expected)
        locas_model.memorize(tokens, keep_top=8)
        assert torch.equal(locas_model(tokens).logits, expected)
        locas_model.memory = with_random_values(locas_model)
        assert not torch.allclose(locas_model(tokens).logits, expected)
        backbone = locas_model.detach()
        assert torch.equal(backbone(tokens).logits, expected)


def test_backbone_frozen_and_only_memory_gets_gradients(family_name, tokens):
    locas_model = locas.attach(tiny_model(family_name), width=4)
    locas_model.memory = with_random_values(locas_model, width=4)
    assert not any(p.requires_grad for p in locas_model.model.parameters())
    locas_model(tokens).logits.sum().backward()
    for name, tensor in locas_model.memory.slot_tensors().items():
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, name


def test_layer_output_matches_slot_by_slot_formula(family_name):
    locas_model = locas.attach(tiny_model(family_name), width=5)
    memory = with_random_values(locas_model, width=5)
    mlp = locas_model.family.mlps(locas_model.model)[1]
    activation = locas_model.family.activation(mlp)
    x = torch.randn(1, 3, memory.hidden_size)
    expected = torch.zeros(1, 3, memory.hidden_size)
    for j in range(memory.width):
        pre = x @ memory.up[1, 0, j]
        strength = activation(x @ memory.gate[1, 0, j]) * pre if memory.gated else activation(pre)
        expected += memory.tau[1, 0, j] * strength.unsqueeze(-1) * memory.down[1, 0, j]
    torch.testing.assert_close(memory.layer_output(1, x, activation), expected, rtol=1e-5, atol=1e-6)


def test_tau_is_mean_output_vector_norm_over_width(family_name):
    model = tiny_model(family_name)
    locas_model = locas.attach(model, width=8)
    mlp = locas_model.family.mlps(model)[0]
    # Each neuron's output vector, read from the raw module: Conv1D stores (in, out), Linear (out, in).
    raw = mlp.c_proj.weight if family_name == "gpt2" else locas_model.family.down_module(mlp).weight.T
    expected = raw.norm(dim=1).mean() / 8
    torch.testing.assert_close(locas_model.memory.tau[0, 0], expected.expand(8))
    assert output_scales(model).shape == (2,)
    # tau_rule "neuron": every slot as strong as an average neuron, whatever the width
    assert locas_model.memory.metadata["tau_rule"] == "paper"
    neuron = locas.attach(locas_model.detach(), width=8, tau_rule="neuron")
    torch.testing.assert_close(neuron.memory.tau[0, 0], (expected * 8).expand(8))
    assert neuron.memory.metadata["tau_rule"] == "neuron"


def test_an_unknown_tau_rule_is_refused():
    with pytest.raises(ValueError, match="unknown tau rule 'big'; choose one of paper, neuron"):
        LocasModel(tiny_model("llama"), tau_rule="big")


@pytest.mark.parametrize("family_name", ["llama", "gpt2"])
def test_batch_of_memories_equals_separate_runs(family_name, tokens):
    locas_model = locas.attach(tiny_model(family_name), width=4)
    batched = with_random_values(locas_model, width=4, batch_size=2)
    with torch.no_grad():
        together = locas_model.compute_nll(tokens, memory=batched)
        for index in range(2):
            alone = locas_model.compute_nll(tokens[index : index + 1], memory=batched.select(index))
            torch.testing.assert_close(together[index : index + 1], alone, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(
            locas_model.compute_nll(tokens[:1], memory=batched.select(0)),
            locas_model.compute_nll(tokens[:1], memory=batched.select(1)),
        )


def test_memory_batch_must_match_input_batch(tokens):
    locas_model = locas.attach(tiny_model("llama"), width=4)
    three = with_random_values(locas_model, width=4, batch_size=3)
    with pytest.raises(ValueError, match="batch 3 cannot serve a batch of 2"):
        locas_model.compute_nll(tokens, memory=three)


def test_compute_nll_is_cross_entropy_and_ignores_padding(tokens):
    locas_model = locas.attach(tiny_model("qwen3"), width=4)
    locas_model.memory = with_random_values(locas_model, width=4)
    mask = torch.ones_like(tokens)
    mask[1, 20:] = 0
    nll = locas_model.compute_nll(tokens, attention_mask=mask)
    assert nll.shape == (2, 23)
    with torch.no_grad():
        logits = locas_model(tokens[:1]).logits
    manual = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:], reduction="none")
    torch.testing.assert_close(nll[0], manual, rtol=1e-5, atol=1e-5)
    assert torch.all(nll[1, 19:] == 0) and torch.all(nll[1, :19] > 0)
    with locas_model.using(None):
        bare = locas_model.compute_nll(tokens[:1], memory=None)
    assert not torch.allclose(bare, nll[:1])  # memory=None means "the attached one", which differs from bare


def test_generate_with_memory_uses_kv_cache_consistently():
    locas_model = locas.attach(tiny_model("llama"), width=4)
    locas_model.memory = with_random_values(locas_model, width=4)
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = locas_model.generate(prompt, use_cache=True, **settings)
    uncached = locas_model.generate(prompt, use_cache=False, **settings)
    with locas_model.using(None):
        bare = locas_model.generate(prompt, **settings)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, bare)


@pytest.mark.parametrize("settings", [dict(num_beams=3), dict(do_sample=True, top_k=1)])
def test_generate_with_a_batched_memory_runs_each_prompts_memory_on_its_copies(settings):
    locas_model = locas.attach(tiny_model("llama"), width=4)
    memory = with_random_values(locas_model, width=4, batch_size=2)
    prompts = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    settings = dict(max_new_tokens=6, num_return_sequences=2, pad_token_id=0, **settings)  # top_k 1: greedy
    locas_model.memory = memory
    together = locas_model.generate(prompts, **settings)
    assert together.shape[0] == 4
    for index in range(2):
        with locas_model.using(memory.select(index)):
            alone = locas_model.generate(prompts[index : index + 1], **settings)
        assert torch.equal(together[2 * index : 2 * index + 2], alone)
    with locas_model.serving([1]):  # rows picked by the caller are repeated as well
        assert torch.equal(locas_model.generate(prompts[1:], **settings), together[2:])
    if "num_beams" in settings:  # generate's second positional argument is a GenerationConfig
        config = GenerationConfig(**{k: v for k, v in settings.items() if k != "max_new_tokens"}, max_new_tokens=6)
        assert torch.equal(locas_model.generate(prompts, config), together)
    with pytest.raises(ValueError, match="a memory with batch 2 serves 2 prompts, one each; got 1"):
        locas_model.generate(prompts[:1], **settings)


def test_a_model_without_weights_is_refused():
    with torch.device("meta"):
        model = tiny_model("llama")
    with pytest.raises(ValueError, match="weights are on the meta device .* load them first"):
        LocasModel(model)


def test_unsupported_architecture_names_the_supported_ones():
    config = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2)
    with pytest.raises(ValueError, match=r"model_type 'opt'.*supported: .*gemma.*gpt2.*llama"):
        LocasModel(OPTForCausalLM(config))


@pytest.mark.parametrize("family_name", GATED_FAMILIES[:1])
def test_bfloat16_backbone_keeps_its_dtype_and_float32_memory(family_name, tokens):
    model = tiny_model(family_name, dtype=torch.bfloat16)
    locas_model = locas.attach(model, width=4)
    assert locas_model.memory.up.dtype == torch.float32
    assert next(model.parameters()).dtype == torch.bfloat16
    assert locas_model(tokens).logits.dtype == torch.bfloat16


def test_memory_layers_run_the_memory_there_only_and_the_backward_stops_below_them(tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    every_layer = locas.LocasModel(model)
    memory = with_random_values(every_layer, width=4)
    down = memory.down.detach().clone()
    down[0] = 0  # the same memory without its layer-0 values
    every_layer.memory = locas.Memory(up=memory.up.detach(), gate=memory.gate.detach(), down=down, tau=memory.tau)
    with torch.no_grad():
        expected = every_layer(tokens).logits
    every_layer.detach()
    top = locas.LocasModel(model, memory=memory, memory_layers=[1])
    with torch.no_grad():
        logits = top(tokens).logits
    torch.testing.assert_close(logits, expected)
    dense = top.to_dense()  # merges layer 1's slots only, as the memory model runs them
    dense.save_pretrained(tmp_path)
    with torch.no_grad():
        assert (AutoModelForCausalLM.from_pretrained(tmp_path)(tokens).logits - logits).abs().max() < 1e-4

    reached = []
    top.family.mlps(model)[0].register_full_backward_hook(lambda *args: reached.append(0))
    top.family.mlps(model)[1].register_full_backward_hook(lambda *args: reached.append(1))
    top(tokens).logits.sum().backward()
    assert reached == [1]  # nothing below the lowest memory layer is back-propagated through
    assert memory.down.grad[0].abs().sum() == 0 and memory.down.grad[1].abs().sum() > 0
    with pytest.raises(ValueError, match=r"memory_layers must be some of the model's layers 0\.\.1, got \[2\]"):
        locas.LocasModel(model, memory_layers=[2])


def memory_hooks(model):
    return [hook for mlp in locas.family_of(model).mlps(model) for hook in mlp._forward_hooks.values()]


def wrapped_llama(tokens):
    """(a tiny Llama, its logits on `tokens`, a LocasModel on it, its attached memory of random values)."""
    model = tiny_model("llama")
    with torch.no_grad():
        expected = model(tokens).logits
    locas_model = locas.attach(model, width=4)
    return model, expected, locas_model, locas_model.attach_memory(with_random_values(locas_model, width=4))


def test_a_second_locas_model_on_a_wrapped_backbone_is_refused_until_detach(tokens):
    model, expected, first, memory = wrapped_llama(tokens)
    with pytest.raises(ValueError, match=r"already carries a LocasModel's memory hooks; call \.detach\(\) on that"):
        LocasModel(model)
    first.detach()
    with first.hooks_removed():  # a detached LocasModel does not put its hooks back afterwards
        pass
    with pytest.raises(ValueError, match=r"was detached from its model; wrap the model again"):
        first.attach_memory(memory)  # it would be ignored: no hooks run it
    second = LocasModel(model)
    with torch.no_grad():
        assert torch.equal(second(tokens).logits, expected)
        second.attach_memory(memory)
        with_memory = second(tokens).logits
    dense = second.to_dense()
    assert memory_hooks(dense) == [] and len(memory_hooks(model)) == 2  # the copy is the bare backbone, merged
    with torch.no_grad():
        assert (dense(tokens).logits - with_memory).abs().max() < 1e-4


def test_memories_can_be_set_while_the_hooks_are_removed_for_a_moment(tokens):
    model, expected, locas_model, memory = wrapped_llama(tokens)
    with torch.no_grad():
        with_memory = locas_model(tokens).logits
        with locas_model.hooks_removed() as backbone:
            assert torch.equal(backbone(tokens).logits, expected)
            locas_model.attach_memory(memory)  # not "detached": the hooks come back after the block
            with locas_model.using(memory):
                assert torch.equal(backbone(tokens).logits, expected)
        assert torch.equal(locas_model(tokens).logits, with_memory)
        with locas_model.hooks_removed():
            locas_model.to_dense()  # a block of its own inside: the hooks come back once, at the outer end
        assert len(memory_hooks(model)) == 2 and torch.equal(locas_model(tokens).logits, with_memory)


def test_a_failed_attach_leaves_no_hooks_behind(tokens):
    model = tiny_model("llama")
    with torch.no_grad():
        expected = model(tokens).logits
    with pytest.raises(ValueError, match="tau_rule 'output' measures"):
        locas.attach(model, tau_rule="output")
    with pytest.raises(ValueError, match="made for"):
        locas.attach(model, memory=locas.attach(tiny_model("gpt2"), width=4).memory)
    assert memory_hooks(model) == []
    with torch.no_grad():
        assert torch.equal(LocasModel(model)(tokens).logits, expected)


@pytest.mark.parametrize("size", [100, 2**24 + 1, 2560 * 9728, 4096 * 14336])
def test_the_weight_signature_positions_stay_inside_large_matrices(size):
    """Qwen3-4B's and Llama-3-8B's down projections hold more than 2^24 numbers, where a float32 linspace rounds
    its last position to `size`, one past the end."""
    positions = spread_positions(size, 16)
    assert positions[0] == 0 and positions[-1] == size - 1
    assert bool((positions[1:] > positions[:-1]).all())


# --- every way of using a memory checks it; bad inputs are named ----------------------------------------


def test_a_memory_for_another_model_is_refused_wherever_it_is_passed(tokens):
    llama = LocasModel(tiny_model("llama"))
    foreign = with_random_values(LocasModel(tiny_model("gpt2")), width=4)
    other_weights = LocasModel(tiny_model("llama", seed=1))  # same architecture: used (attach_memory would warn)
    for use in (
        lambda: llama.compute_nll(tokens, memory=foreign),
        lambda: llama.using(foreign).__enter__(),
        lambda: LocasModel(tiny_model("llama"), memory=foreign),
    ):
        with pytest.raises(ValueError, match="this memory was made for .*gpt2.* but the model is .*llama"):
            use()
    assert llama.memory is None
    assert llama.compute_nll(tokens, memory=with_random_values(other_weights, width=4)).isfinite().all()


def test_a_refused_memory_leaves_the_model_unwrapped(tokens):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="made for"):
        LocasModel(model, memory=with_random_values(LocasModel(tiny_model("gpt2")), width=4))
    assert memory_hooks(model) == [] and LocasModel.wrapping(model) is None


def test_the_mismatch_message_names_the_mlp_widths():
    narrow = tiny_model("llama")
    wide = AutoModelForCausalLM.from_config(LlamaConfig(**{**narrow.config.to_dict(), "intermediate_size": 56}))
    memory = locas.attach(narrow, width=4).memory
    with pytest.raises(ValueError, match=r"MLP width 48, fingerprint .* but the model is .*MLP width 56"):
        locas.attach(wide, memory=memory)


def test_a_detached_model_refuses_a_memory_passed_for_one_use(tokens):
    locas_model = locas.attach(tiny_model("llama"), width=4)
    memory = with_random_values(locas_model, width=4)
    locas_model.detach()
    for use in (lambda: locas_model.compute_nll(tokens, memory=memory), lambda: locas_model.using(memory).__enter__()):
        with pytest.raises(ValueError, match="was detached from its model; wrap the model again"):
            use()
    assert locas_model.compute_nll(tokens).isfinite().all()  # the bare backbone, as asked


def test_a_wrapper_no_longer_held_is_found_by_wrapping_and_detached(tokens):
    model = tiny_model("llama")
    with torch.no_grad():
        expected = model(tokens).logits
    LocasModel(model).compute_nll(tokens)  # the wrapper is gone, its hooks are not
    with pytest.raises(ValueError, match=r"LocasModel\.wrapping\(model\)\.detach\(\) if you no longer hold it"):
        LocasModel(model)
    LocasModel.wrapping(model).detach()
    assert LocasModel.wrapping(model) is None and memory_hooks(model) == []
    with torch.no_grad():
        assert torch.equal(LocasModel(model)(tokens).logits, expected)


def test_a_copy_of_a_wrapped_model_is_the_bare_backbone_and_can_be_wrapped(tokens):
    model, expected, locas_model, memory = wrapped_llama(tokens)
    copied = copy.deepcopy(model)  # carries inert hooks that reference nothing
    assert [hook.locas_model for hook in memory_hooks(copied)] == [None, None]
    with torch.no_grad():
        assert torch.equal(copied(tokens).logits, expected)
        with_memory = locas_model(tokens).logits
    assert not torch.equal(with_memory, expected)
    second = LocasModel(copied, memory=memory)  # the copied hooks are dropped
    assert len(memory_hooks(copied)) == 2 and LocasModel.wrapping(copied) is second
    with torch.no_grad():
        torch.testing.assert_close(second(tokens).logits, with_memory)
        assert torch.equal(locas_model(tokens).logits, with_memory)  # the original is untouched


def test_a_copy_of_a_locas_model_runs_its_own_copy_of_the_memory(tokens):
    _, _, locas_model, _ = wrapped_llama(tokens)
    copied = copy.deepcopy(locas_model)
    assert copied.model is not locas_model.model and copied.memory is not locas_model.memory
    with torch.no_grad():
        torch.testing.assert_close(copied(tokens).logits, locas_model(tokens).logits, rtol=0, atol=0)
        copied.memory.down.mul_(2)
        assert not torch.equal(copied(tokens).logits, locas_model(tokens).logits)
    assert LocasModel.wrapping(copied.model) is copied and LocasModel.wrapping(locas_model.model) is locas_model
    locas_model.train()  # modes are copied as they are, the wrapper's and the backbone's
    copied = copy.deepcopy(locas_model)
    assert copied.training and copied.model.training and copied.memory.training
    locas_model.eval()
    assert not copy.deepcopy(locas_model).training  # (a new LocasModel starts in training mode)
    with pytest.raises(TypeError, match="cannot be copied shallowly .* use copy.deepcopy"):
        copy.copy(locas_model)


def test_torch_save_of_a_wrapped_model_or_a_locas_model_loads_like_a_copy(tokens, tmp_path):
    model, expected, locas_model, memory = wrapped_llama(tokens)
    with torch.no_grad():
        with_memory = locas_model(tokens).logits
    torch.save(model, tmp_path / "backbone.pt")
    torch.save(locas_model, tmp_path / "locas.pt")
    loaded_backbone = torch.load(tmp_path / "backbone.pt", weights_only=False)
    loaded = torch.load(tmp_path / "locas.pt", weights_only=False)
    assert LocasModel.wrapping(loaded_backbone) is None and LocasModel.wrapping(loaded.model) is loaded
    with torch.no_grad():
        assert torch.equal(loaded_backbone(tokens).logits, expected)  # bare, as a copy
        assert torch.equal(loaded(tokens).logits, with_memory)  # the memory runs, through hooks of its own
    assert torch.equal(loaded.memory.down, memory.down) and loaded.memory is not memory
    locas_model.detach()
    torch.save(locas_model, tmp_path / "detached.pt")
    with pytest.raises(ValueError, match="was detached"):
        torch.load(tmp_path / "detached.pt", weights_only=False).attach_memory(memory)


@pytest.mark.parametrize(
    ("make", "error", "fragment"),
    [
        (lambda ids: ids[0], ValueError, r"got \(24,\); add the batch axis: input_ids\.unsqueeze\(0\)"),
        (lambda ids: ids.float(), ValueError, r"dtype torch\.long, got torch\.float32; use input_ids\.long\(\)"),
        (lambda ids: ids.int(), ValueError, r"dtype torch\.long, got torch\.int32; use input_ids\.long\(\)"),
        (lambda ids: {"input_ids": ids}, TypeError, r"got dict; pass encoding\['input_ids'\]"),
        (lambda ids: ids.tolist(), TypeError, r"got list; make a tensor: .* torch\.tensor\(rows\) for equal-length"),
        (lambda ids: ids + 200, ValueError, r"outside the model's vocabulary 0\.\.127 .*own tokenizer"),
        (lambda ids: ids[:, :0], ValueError, r"shape \(batch, seq\) with seq >= 1"),
    ],
)
def test_token_ids_a_model_cannot_read_are_named(tokens, make, error, fragment):
    locas_model = locas.attach(tiny_model("llama"), width=4)
    for use in (lambda: locas_model.compute_nll(make(tokens)), lambda: locas_model.memorize(make(tokens), keep_top=4)):
        with pytest.raises(error, match=fragment):
            use()


def test_a_mask_of_another_shape_and_too_many_positions_are_named(tokens):
    gpt2 = locas.attach(tiny_model("gpt2"), width=4)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 23\), input_ids \(2, 24\)"):
        gpt2.compute_nll(tokens, attention_mask=torch.ones(2, 23, dtype=torch.long))
    with pytest.raises(ValueError, match=r"300 tokens in a sequence, but this model has 256 positions"):
        gpt2.compute_nll(torch.zeros(1, 300, dtype=torch.long))


def test_a_model_without_its_language_model_head_is_refused():
    with pytest.raises(ValueError, match="LlamaModel has no language-model head: load the causal LM"):
        LocasModel(tiny_model("llama").model)


def test_wrapping_puts_the_backbone_in_eval_mode_and_detach_gives_its_mode_back(tokens):
    model = tiny_model("gpt2").train()  # GPT-2 has dropout: in train mode two scores differ
    assert not torch.equal(model(tokens).logits, model(tokens).logits)
    locas_model = LocasModel(model)
    assert not model.training and not any(module.training for module in model.modules())
    assert torch.equal(locas_model.compute_nll(tokens), locas_model.compute_nll(tokens))
    assert locas_model.detach().training
    with pytest.raises(ValueError, match="must be a positive integer"):
        locas.attach(model, width=0)  # refused: the model is given back as it was
    assert model.training and memory_hooks(model) == []


@pytest.mark.parametrize("width", [0, -3, 8.0, True])
def test_attach_refuses_a_width_that_is_not_a_positive_integer(width):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=rf"memory width \(keep_top\) must be a positive integer, got {width!r}"):
        locas.attach(model, width=width)
    assert memory_hooks(model) == []


def test_the_module_level_functions_say_they_take_a_locas_model(tokens):
    model = tiny_model("llama")
    memory = locas.attach(tiny_model("llama"), width=4).memory
    with pytest.raises(TypeError, match=r"to_dense takes a LocasModel, got LlamaForCausalLM: wrap the model"):
        locas.to_dense(model, memory)
    with pytest.raises(
        TypeError, match=r"made for a LocasModel, got LlamaForCausalLM: .*LocasModel\(model\)\.memorize"
    ):
        locas.memorize(model, tokens)


def test_a_diverged_memory_is_not_merged(tokens):
    locas_model = locas.attach(tiny_model("llama"), width=4)
    with torch.no_grad():
        locas_model.memory.down[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="this memory's down holds NaN or inf .* it cannot be merged"):
        locas_model.to_dense()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_nll_equals_cross_entropy_in_value_and_gradient(dtype):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, 40, generator=generator) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 40, (2, 5), generator=generator)

    def cross_entropy(logits, targets):
        return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")

    assert_same_values_and_gradients(target_nll, cross_entropy, logits, targets)


def test_target_nll_refuses_a_second_backward_and_a_second_derivative():
    logits = torch.randn(4, 10, requires_grad=True)
    loss = target_nll(logits, torch.randint(0, 10, (4,))).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    (gradient,) = torch.autograd.grad(
        target_nll(logits, torch.zeros(4, dtype=torch.long)).square().sum(), logits, create_graph=True
    )
    with pytest.raises(RuntimeError, match="differentiate twice"):  # no silent second derivative
        gradient.sum().backward()


def test_token_nll_over_a_large_vocabulary_agrees_with_float64():
    """Taken across the vocabulary axis of transposed logits, a CPU log-softmax was off by 1.2e-4 here."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 65, 49152, generator=generator) * 4
    ids = torch.randint(0, 49152, (2, 65), generator=generator)
    exact = -torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert (locas.model.token_nll(logits, ids).double() - exact).abs().max() < 3e-5
