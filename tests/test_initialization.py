import pytest
import torch
from conftest import GATED_FAMILIES, MLP_FAMILIES, tiny_model

import locas
from locas.initialization import neuron_scores, select_neurons


def hand_scores(locas_model, tokens, mask=None, scored=None):
    """Mean |intermediate activation| per neuron over the `scored` tokens (default: those of the attention
    `mask`), computed from the raw weights and each MLP's input."""
    family = locas_model.family
    inputs = {}
    mlps = family.mlps(locas_model.model)
    handles = [
        mlp.register_forward_pre_hook(lambda module, args, i=i: inputs.__setitem__(i, args[0]))
        for i, mlp in enumerate(mlps)
    ]
    with torch.no_grad(), locas_model.using(None):
        locas_model.model(tokens, attention_mask=mask)
    for handle in handles:
        handle.remove()
    mask = torch.ones_like(tokens) if mask is None else mask
    scored = mask if scored is None else scored
    scores = []
    for i, mlp in enumerate(mlps):
        x = inputs[i]
        if family.gated:
            act = mlp.act_fn(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
        elif family.name == "gpt2":
            act = mlp.act(x @ mlp.c_fc.weight + mlp.c_fc.bias)
        else:
            act = mlp.act(x @ mlp.dense_h_to_4h.weight.T + mlp.dense_h_to_4h.bias)
        weights = scored.unsqueeze(-1).float()
        scores.append((act.abs() * weights).sum(dim=(0, 1)) / weights.sum())
    return torch.stack(scores)  # (layers, mlp_width)


def key_rows(locas_model, layer):
    weights = locas_model.family.read(locas_model.family.mlps(locas_model.model)[layer])
    return weights.up.detach(), None if weights.gate is None else weights.gate.detach()


def unit(rows):
    return rows / rows.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("memory_init", ["highest", "lowest"])
def test_clones_the_neurons_with_extreme_mean_activation(family_name, tokens, memory_init):
    locas_model = locas.attach(tiny_model(family_name), width=4)
    memory = locas_model.memorize(tokens, keep_top=6, memory_init=memory_init)
    expected = hand_scores(locas_model, tokens).topk(6, dim=-1, largest=memory_init == "highest").indices
    for layer in range(2):
        up, gate = key_rows(locas_model, layer)
        torch.testing.assert_close(memory.up[layer, 0], unit(up[expected[layer]]))
        if gate is not None:
            torch.testing.assert_close(memory.gate[layer, 0], unit(gate[expected[layer]]))
    assert torch.all(memory.down == 0)
    assert memory.width == 6 and memory.metadata["init"] == memory_init
    with torch.no_grad():
        assert torch.equal(locas_model(tokens).logits, locas_model.detach()(tokens).logits)


def test_scores_ignore_padding_and_per_sequence_gives_one_memory_each(tokens):
    locas_model = locas.attach(tiny_model("qwen3"), width=4)
    mask = torch.ones_like(tokens)
    mask[1, 15:] = 0
    scores = neuron_scores(locas_model, tokens, mask)
    torch.testing.assert_close(scores[:, 0], hand_scores(locas_model, tokens[:1]))
    torch.testing.assert_close(scores[:, 1], hand_scores(locas_model, tokens[1:, :15]))
    batched = locas_model.memorize(tokens, attention_mask=mask, keep_top=5, per_sequence=True)
    assert batched.batch_size == 2
    alone = locas_model.memorize(tokens[1:, :15], keep_top=5)
    torch.testing.assert_close(batched.up[:, 1], alone.up[:, 0])
    pooled = locas_model.memorize(tokens, attention_mask=mask, keep_top=5)
    expected = hand_scores(locas_model, tokens, mask).topk(5, dim=-1).indices
    up, _ = key_rows(locas_model, 0)
    torch.testing.assert_close(pooled.up[0, 0], unit(up[expected[0]]))
    assert pooled.metadata["tokens_memorized"] == 24 + 15


def test_random_index_is_seeded_and_clones_real_rows():
    locas_model = locas.attach(tiny_model("llama"), width=4)
    tokens = torch.randint(0, 128, (1, 10))
    first = locas_model.memorize(tokens, keep_top=8, memory_init="random_index", seed=3)
    again = locas_model.memorize(tokens, keep_top=8, memory_init="random_index", seed=3)
    other = locas_model.memorize(tokens, keep_top=8, memory_init="random_index", seed=4)
    assert torch.equal(first.up, again.up) and not torch.equal(first.up, other.up)
    up, gate = key_rows(locas_model, 1)
    similarity = first.up[1, 0] @ unit(up).T  # each slot is exactly one normalised row
    rows = similarity.argmax(dim=-1)
    torch.testing.assert_close(similarity.max(dim=-1).values, torch.ones(8))
    assert rows.unique().numel() == 8
    torch.testing.assert_close(first.gate[1, 0], unit(gate[rows]))  # gate rows of the same neurons
    assert torch.equal(
        select_neurons(torch.zeros(1, 1, 48), 8, "random_index", seed=3)[0, 0],
        torch.randperm(48, generator=torch.Generator().manual_seed(3))[:8],
    )


def test_random_init_is_gaussian_unit_norm_and_not_cloned():
    locas_model = locas.attach(tiny_model("gemma"), width=4)
    memory = locas_model.memorize(torch.randint(0, 128, (1, 10)), keep_top=8, memory_init="random", seed=0)
    torch.testing.assert_close(memory.up.norm(dim=-1), torch.ones(2, 1, 8))
    up, _ = key_rows(locas_model, 0)
    assert (memory.up[0, 0] @ unit(up).T).abs().max() < 0.99
    assert torch.all(memory.down == 0)


@pytest.mark.parametrize("family_name", MLP_FAMILIES)
def test_gradient_init_stores_tokens_and_raises_their_likelihood(family_name):
    locas_model = locas.attach(tiny_model(family_name), width=4)
    tokens = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(5))
    memory = locas_model.memorize(tokens, keep_top=3, memory_init="gradient")
    assert memory.width == 3 and not memory.gated
    torch.testing.assert_close(memory.up.norm(dim=-1), torch.ones(2, 1, 3))
    # values are normalised jointly over layers and hidden: unit norm per slot across all layers
    torch.testing.assert_close(memory.down.pow(2).sum(dim=(0, 3)).sqrt(), torch.ones(1, 3))
    # the three chosen tokens are the three with the highest loss, and a small step along the
    # stored gradients raises their likelihood
    with locas_model.using(None):
        before = locas_model.compute_nll(tokens)[0]
    chosen = before.topk(3).indices
    memory.tau.mul_(0.05)
    after = locas_model.compute_nll(tokens, memory=memory)[0]
    assert after[chosen].sum() < before[chosen].sum()
    # keys are the normalised MLP inputs at those positions
    inputs = {}
    mlp = locas_model.family.mlps(locas_model.model)[1]
    handle = mlp.register_forward_pre_hook(lambda module, args: inputs.__setitem__("x", args[0]))
    with torch.no_grad(), locas_model.using(None):
        locas_model.model(tokens)
    handle.remove()
    torch.testing.assert_close(memory.up[1, 0], unit(inputs["x"][0, chosen]))


def test_gradient_init_refuses_gated_models_and_short_texts():
    with pytest.raises(ValueError, match="2-layer-MLP families"):
        locas.attach(tiny_model("llama")).memorize(torch.randint(0, 128, (1, 10)), memory_init="gradient")
    with pytest.raises(ValueError, match="3 slots need at least 3 predicted tokens, the text has 2"):
        locas.attach(tiny_model("gpt2")).memorize(torch.randint(0, 128, (1, 3)), keep_top=3, memory_init="gradient")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(memory_init="best"), "unknown memory_init 'best'"),
        (dict(keep_top=0), "must be a positive integer, got 0"),
        (dict(keep_top=49), "cannot clone 49 neurons from an MLP of 48"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        locas.attach(tiny_model("llama")).memorize(torch.randint(0, 128, (1, 10)), **kwargs)


@pytest.mark.parametrize("family_name", GATED_FAMILIES[:1])
def test_empty_input_is_refused(family_name):
    with pytest.raises(ValueError, match=r"shape \(batch, seq\)"):
        locas.attach(tiny_model(family_name)).memorize(torch.zeros(1, 0, dtype=torch.long))


def test_a_prefix_is_run_but_not_scored(tokens):
    locas_model = locas.attach(tiny_model("llama"), width=4)
    with_prefix = neuron_scores(locas_model, tokens, prefix_length=3)
    scored = torch.ones_like(tokens)
    scored[:, :3] = 0  # the backbone sees the first 3 tokens; their activations are not in the mean
    for row in range(tokens.shape[0]):
        torch.testing.assert_close(
            with_prefix[:, row], hand_scores(locas_model, tokens[row : row + 1], scored=scored[row : row + 1])
        )
    assert not torch.allclose(with_prefix, neuron_scores(locas_model, tokens))
    memory = locas_model.memorize(tokens, keep_top=5, prefix_length=3)
    expected = hand_scores(locas_model, tokens, scored=scored).topk(5, dim=-1).indices
    up, _ = key_rows(locas_model, 1)
    torch.testing.assert_close(memory.up[1, 0], unit(up[expected[1]]))
    assert memory.metadata["tokens_memorized"] == tokens.numel() - 3 * tokens.shape[0]
    for bad in (-1, tokens.shape[1]):
        with pytest.raises(ValueError, match=f"prefix_length {bad} leaves no token"):
            locas_model.memorize(tokens, keep_top=5, prefix_length=bad)
    with pytest.raises(ValueError, match="'gradient' takes no prefix"):
        locas.attach(tiny_model("gpt2"), width=4).memorize(tokens, keep_top=4, memory_init="gradient", prefix_length=1)


def hand_output_tau(locas_model, memory, tokens, ratio, scored=None):
    """The `output` rule from its definition: per layer, ratio x median ||mlp(x_t)|| / median sum_j |act_j(x_t)|
    over the scored tokens, with act_j computed from the memory's raw key (and gate) rows."""
    family = locas_model.family
    captured = {}
    mlps = family.mlps(locas_model.model)
    handles = [
        mlp.register_forward_hook(lambda module, args, out, i=i: captured.__setitem__(i, (args[0], out)))
        for i, mlp in enumerate(mlps)
    ]
    with torch.no_grad(), locas_model.using(None):
        locas_model.model(tokens)
    for handle in handles:
        handle.remove()
    scored = torch.ones_like(tokens, dtype=torch.bool) if scored is None else scored
    taus = []
    for i, mlp in enumerate(mlps):
        x, out = captured[i]
        pre = x @ memory.up[i, 0].T
        act = family.activation(mlp)(x @ memory.gate[i, 0].T) * pre if memory.gated else family.activation(mlp)(pre)
        taus.append(ratio * out.norm(dim=-1)[scored].median() / act.abs().sum(dim=-1)[scored].median())
    return torch.stack(taus)


@pytest.mark.parametrize("family_name", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("memory_init", ["highest", "random"])
def test_output_rule_sets_tau_from_the_mlp_output_measured_on_the_text(family_name, memory_init, tokens):
    locas_model = locas.LocasModel(tiny_model(family_name), tau_rule="output", output_ratio=0.3)
    memory = locas_model.memorize(tokens, keep_top=6, memory_init=memory_init, prefix_length=1)
    scored = torch.ones_like(tokens, dtype=torch.bool)
    scored[:, 0] = False  # the prefix is run but not measured
    expected = hand_output_tau(locas_model, memory, tokens, 0.3, scored)
    torch.testing.assert_close(memory.tau, expected.view(-1, 1, 1).expand(-1, 1, 6), rtol=1e-5, atol=0)
    assert memory.metadata["tau_rule"] == "output" and memory.metadata["output_ratio"] == 0.3
    # the bound is relative: a wider memory gets a smaller tau per slot, the same ratio in all
    wider = locas_model.memorize(tokens, keep_top=12, memory_init=memory_init, prefix_length=1)
    assert (wider.tau[:, 0, 0] < memory.tau[:, 0, 0]).all()


@pytest.mark.parametrize("tau_rule", ["output", "paper"])
def test_memorize_runs_the_backbone_once(tau_rule, tokens):
    model = tiny_model("llama")
    locas_model = locas.LocasModel(model, tau_rule=tau_rule)
    forwards = []
    handle = model.get_input_embeddings().register_forward_hook(lambda *args: forwards.append(1))
    try:
        locas_model.memorize(tokens, keep_top=4)
    finally:
        handle.remove()
    assert len(forwards) == 1  # the neuron scores and the measured tau come from the same pass


def test_output_rule_gives_each_sequence_its_own_tau(tokens):
    locas_model = locas.LocasModel(tiny_model("llama"), tau_rule="output")
    texts = torch.stack([tokens[0], torch.randint(0, 128, tokens[0].shape, generator=torch.Generator().manual_seed(5))])
    batched = locas_model.memorize(texts, keep_top=4, per_sequence=True)
    assert batched.tau.shape == (2, 2, 4) and not torch.allclose(batched.tau[:, 0], batched.tau[:, 1])
    for row in range(2):
        alone = locas_model.memorize(texts[row : row + 1], keep_top=4)
        torch.testing.assert_close(batched.tau[:, row : row + 1], alone.tau)
    pooled = locas_model.memorize(texts, keep_top=4)  # one memory: measured over both texts
    assert pooled.tau.shape == (2, 1, 4)


def test_output_rule_needs_a_text_and_a_positive_ratio():
    with pytest.raises(ValueError, match=r"tau_rule 'output' measures .*\.memorize\(input_ids, keep_top"):
        locas.attach(tiny_model("llama"), width=4, tau_rule="output")
    with pytest.raises(ValueError, match="output_ratio must be a positive number, got 0"):
        locas.LocasModel(tiny_model("llama"), tau_rule="output", output_ratio=0)


def test_output_rule_leaves_padding_out_and_refuses_a_row_with_nothing_to_measure(tokens):
    locas_model = locas.LocasModel(tiny_model("llama"), tau_rule="output")
    tokens = tokens[:1]
    short = tokens[:, :6]
    padded = torch.cat([short, torch.zeros_like(tokens[:, 6:])], dim=1)  # right padding (causal: no effect on 0..5)
    mask = torch.cat([torch.ones_like(short), torch.zeros_like(tokens[:, 6:])], dim=1)
    texts, masks = torch.cat([padded, tokens]), torch.cat([mask, torch.ones_like(tokens)])
    batched = locas_model.memorize(texts, attention_mask=masks, keep_top=4, per_sequence=True)
    torch.testing.assert_close(batched.tau[:, :1], locas_model.memorize(short, keep_top=4).tau)
    masks[0] = 0
    with pytest.raises(ValueError, match="sequence 0 has no token .* to measure tau on"):
        locas_model.memorize(texts, attention_mask=masks, keep_top=4, per_sequence=True, memory_init="random")


def test_output_rule_measures_the_gradient_inits_keys(tokens):
    locas_model = locas.LocasModel(tiny_model("gpt2"), tau_rule="output", output_ratio=0.2)
    memory = locas_model.memorize(tokens, keep_top=4, memory_init="gradient")
    expected = hand_output_tau(locas_model, memory, tokens, 0.2)
    torch.testing.assert_close(memory.tau, expected.view(-1, 1, 1).expand(-1, 1, 4), rtol=1e-5, atol=0)


def test_memorize_leaves_no_values_in_layers_that_do_not_run_the_memory(tokens):
    locas_model = locas.LocasModel(tiny_model("gpt2"), memory_layers=[1])
    memory = locas_model.memorize(tokens, keep_top=4, memory_init="gradient")
    assert memory.down[0].abs().sum() == 0 and memory.down[1].abs().sum() > 0


def test_measured_tau_refuses_a_pass_over_other_text(tokens):
    from locas.initialization import backbone_pass, measured_tau

    locas_model = locas.LocasModel(tiny_model("llama"), tau_rule="output")
    memory = locas_model.memorize(tokens, keep_top=4)
    recorded = backbone_pass(locas_model, tokens, keep_inputs=True)
    torch.testing.assert_close(measured_tau(locas_model, memory, tokens, recorded=recorded), memory.tau)
    for other in (backbone_pass(locas_model, tokens), backbone_pass(locas_model, tokens[:, :-2], keep_inputs=True)):
        with pytest.raises(ValueError, match="backbone_pass of these input_ids with keep_inputs=True"):
            measured_tau(locas_model, memory, tokens, recorded=other)
