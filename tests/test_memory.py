import copy
import io
import json
import re
import warnings

import pytest
import torch
from conftest import TINY_CONFIGS, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

import locas
from locas.memory import Memory


def random_memory(layers=2, batch=1, width=5, hidden=8, gated=True, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    shape = (layers, batch, width, hidden)

    def draw():
        return torch.randn(shape, generator=generator) * scale

    tau = torch.rand((layers, batch, width), generator=generator) + 0.1
    return Memory(up=draw(), gate=draw() if gated else None, down=draw(), tau=tau, metadata={"fingerprint": "x"})


def test_clip_rescales_long_vectors_to_unit_norm_and_leaves_short_ones():
    memory = random_memory(scale=3.0)
    with torch.no_grad():
        memory.up[0, 0, 0] = torch.full((8,), 0.1)  # norm 0.28: must stay as it is
    before = {name: t.detach().clone() for name, t in memory.slot_tensors().items()}
    memory.clip_()
    for name, tensor in memory.slot_tensors().items():
        old_norms = before[name].norm(dim=-1)
        new_norms = tensor.norm(dim=-1)
        long = old_norms > 1
        torch.testing.assert_close(new_norms[long], torch.ones_like(new_norms[long]))
        assert torch.equal(tensor[~long], before[name][~long])
        # direction kept
        torch.testing.assert_close(tensor[long], before[name][long] / old_norms[long].unsqueeze(-1))
    assert torch.equal(memory.up[0, 0, 0], torch.full((8,), 0.1))


@pytest.mark.parametrize("gated", [True, False])
def test_concat_output_is_the_sum_and_remove_slots_undoes_it(gated):
    first, second = random_memory(width=3, gated=gated, seed=1), random_memory(width=5, gated=gated, seed=2)
    activation = torch.nn.SiLU()
    x = torch.randn(1, 4, 8)
    both = first.concat(second)
    assert both.width == 8
    for layer in range(2):
        torch.testing.assert_close(
            both.layer_output(layer, x, activation),
            first.layer_output(layer, x, activation) + second.layer_output(layer, x, activation),
        )
        torch.testing.assert_close(
            both.remove_slots(range(3, 8)).layer_output(layer, x, activation), first.layer_output(layer, x, activation)
        )
    with pytest.raises(IndexError, match=r"slot indices must lie in \[0, 8\)"):
        both.remove_slots([8])
    with pytest.raises(ValueError, match="empty memory"):
        first.remove_slots([0, 1, 2])


def test_concat_refuses_different_shapes():
    with pytest.raises(ValueError, match="cannot combine"):
        random_memory(hidden=8).concat(random_memory(hidden=16))
    with pytest.raises(ValueError, match="cannot combine"):
        random_memory(gated=True).concat(random_memory(gated=False))


def test_constructor_checks_shapes():
    with pytest.raises(ValueError, match=r"\(layers, batch, width, hidden\)"):
        Memory(up=torch.zeros(2, 1, 3, 4), down=torch.zeros(2, 1, 3, 5), tau=torch.ones(2, 3))
    with pytest.raises(ValueError, match="tau must have shape"):
        Memory(up=torch.zeros(2, 1, 3, 4), down=torch.zeros(2, 1, 3, 4), tau=torch.ones(2, 4))


def test_select_picks_one_sequence():
    memory = random_memory(batch=3)
    one = memory.select(2)
    assert one.batch_size == 1 and torch.equal(one.down[:, 0], memory.down[:, 2])
    with pytest.raises(IndexError, match="out of range for a batch of 3"):
        memory.select(3)


@pytest.mark.parametrize("family_name", ["llama", "gpt2"])
def test_file_round_trip_keeps_tensors_and_metadata(family_name, tmp_path):
    locas_model = locas.attach(tiny_model(family_name), width=4)
    memory = locas_model.memorize(torch.randint(0, 128, (1, 12)), keep_top=4)
    with torch.no_grad():
        memory.down.normal_()
    path = memory.save(tmp_path / "memory.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["memory.safetensors"]  # no partial file left
    loaded = locas.load_memory(path, locas_model.model)
    for name, tensor in memory.slot_tensors().items():
        assert torch.equal(loaded.slot_tensors()[name], tensor.detach())
    assert torch.equal(loaded.tau, memory.tau)
    for key in ("fingerprint", "family", "init", "tokens_memorized", "base_model", "num_layers", "hidden_size"):
        assert loaded.metadata[key] == memory.metadata[key]
    assert loaded.metadata["init"] == "highest" and loaded.metadata["tokens_memorized"] == 12


def test_loading_onto_another_base_names_both(tmp_path):
    small = locas.attach(tiny_model("llama"), width=4)
    path = small.memory.save(tmp_path / "m.safetensors")
    wider = AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY_CONFIGS["llama"]().to_dict(), "hidden_size": 64}))
    with pytest.raises(ValueError, match=r"made for .*hidden 32.* but the model is .*hidden 64"):
        locas.load_memory(path, wider)
    deeper = AutoModelForCausalLM.from_config(
        LlamaConfig(**{**TINY_CONFIGS["llama"]().to_dict(), "num_hidden_layers": 3})
    )
    with pytest.raises(ValueError, match=r"2 layers.* but the model is .*3 layers"):
        locas.load_memory(path, deeper)
    # same hidden size and depth, other MLP width: only the fingerprint tells them apart
    other = AutoModelForCausalLM.from_config(
        LlamaConfig(**{**TINY_CONFIGS["llama"]().to_dict(), "intermediate_size": 40})
    )
    with pytest.raises(ValueError, match=r"fingerprint .* but the model is .*fingerprint"):
        locas.load_memory(path, other)
    with pytest.raises(ValueError, match="made for"):
        locas.load_memory(path, tiny_model("gpt2"))


def test_loading_refuses_missing_foreign_and_corrupt_files(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        locas.load_memory(tmp_path / "nope.safetensors", model)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a locas memory"):
        locas.load_memory(foreign, model)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        locas.load_memory(corrupt, model)


def test_same_architecture_with_other_weights_loads_with_a_warning(tmp_path):
    path = locas.attach(tiny_model("llama", seed=0), width=4).memory.save(tmp_path / "m.safetensors")
    other_weights = tiny_model("llama", seed=1)
    with torch.no_grad():
        for mlp in locas.family_of(other_weights).mlps(other_weights):
            mlp.down_proj.weight.mul_(1.5)
    with pytest.warns(UserWarning, match="MLP weights differ"):
        locas.load_memory(path, other_weights)


def same_norms_other_weights(seed=0):
    """A tiny llama whose down projections are reversed along the hidden axis: every neuron's output vector keeps
    its norm (so `output_scales` match the original's), but the weights are other ones."""
    model = tiny_model("llama", seed=seed)
    with torch.no_grad():
        for mlp in locas.family_of(model).mlps(model):
            mlp.down_proj.weight.copy_(mlp.down_proj.weight.flip(0))
    return model


def test_weights_of_another_init_warn_and_a_half_precision_copy_does_not(tmp_path):
    path = locas.attach(tiny_model("llama"), width=4).memory.save(tmp_path / "m.safetensors")
    for dtype in (torch.bfloat16, torch.float16):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            locas.load_memory(path, tiny_model("llama").to(dtype))
    for other in (tiny_model("llama", seed=1), same_norms_other_weights()):
        with pytest.warns(UserWarning, match="MLP weights differ"):
            locas.load_memory(path, other)


def test_the_weights_warning_names_the_users_call(tmp_path):
    memory = locas.attach(tiny_model("llama"), width=4).memory
    path = memory.save(tmp_path / "m.safetensors")
    calls = {
        "load_memory onto a model": lambda model: locas.load_memory(path, model),
        "load_memory onto a LocasModel": lambda model: locas.load_memory(path, locas.LocasModel(model)),
        "attach_memory": lambda model: locas.LocasModel(model).attach_memory(memory),
    }
    for name, call in calls.items():
        with pytest.warns(UserWarning, match="MLP weights differ") as record:
            call(same_norms_other_weights())
        assert [w.filename for w in record if "MLP weights differ" in str(w.message)] == [__file__], name


def test_a_file_without_a_weight_signature_loads_without_its_warning(tmp_path):
    memory = locas.attach(tiny_model("llama"), width=4).memory
    del memory.metadata["weight_signature"]  # as written by older versions
    path = memory.save(tmp_path / "old.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        locas.load_memory(path, same_norms_other_weights())


def save_with_header(path, memory, header: str):
    tensors = {name: t.detach() for name, t in memory.slot_tensors().items()} | {"tau": memory.tau}
    save_file(tensors, str(path), metadata={"locas": header})
    return path


def test_saving_and_loading_refuse_non_finite_values(tmp_path):
    for name, value in (("down", float("nan")), ("tau", float("inf")), ("up", -float("inf"))):
        memory = random_memory()
        path = memory.save(tmp_path / f"{name}.safetensors")
        with torch.no_grad():
            getattr(memory, name)[1, 0, 2] = value
        with pytest.raises(ValueError, match=f"this memory's {name} holds NaN or inf .* it is not saved"):
            memory.save(tmp_path / "diverged.safetensors")
        assert not (tmp_path / "diverged.safetensors").exists()
        tensors, metadata = load_file(path), safe_open(path, "pt").metadata()
        tensors[name][1, 0, 2] = value  # a file corrupted after it was written
        save_file(tensors, str(path), metadata=metadata)
        problem = f"{path}' holds non-finite values (NaN or inf) in '{name}'; it is corrupt: memorize or train it again"
        with pytest.raises(ValueError, match=re.escape(problem)):
            Memory.load(path)


def test_stacking_no_memories_says_so():
    with pytest.raises(ValueError, match="no memories to stack"):
        Memory.stack([])


def test_loading_refuses_corrupt_metadata_naming_the_file(tmp_path):
    memory = random_memory(layers=2)
    fields = {"fingerprint": "x", "format_version": 2, "width": 5, "gated": True}
    per_layer = "output_scales must be a list of 2 numbers, one per layer"
    signature = "weight_signature must be a list of 2 equally long lists of numbers, one per layer"
    cases = {
        "{'fingerprint': 'x'}": "Expecting property name enclosed in double quotes",
        "[2]": "not a JSON object",
        json.dumps(fields | {"output_scales": ["a", "b"]}): per_layer,
        json.dumps(fields | {"output_scales": [0.1]}): per_layer,
        json.dumps(fields | {"output_scales": 0.1}): per_layer,
        json.dumps(fields | {"output_scales": [0.1, True]}): per_layer,
        json.dumps(fields | {"weight_signature": [[0.1], [0.1, 0.2]]}): signature,
        json.dumps(fields | {"weight_signature": [0.1, 0.2]}): signature,
    }
    for index, (header, problem) in enumerate(cases.items()):
        path = save_with_header(tmp_path / f"{index}.safetensors", memory, header)
        with pytest.raises(ValueError, match=re.escape(f"{path}' has unreadable locas metadata (") + ".*" + problem):
            Memory.load(path)
    fine = json.dumps(fields | {"output_scales": [1, 0.5], "weight_signature": [[1, 0.5], [0.25, 0]]})
    assert Memory.load(save_with_header(tmp_path / "fine.safetensors", memory, fine)).metadata["output_scales"] == [
        1,
        0.5,
    ]


def test_loading_refuses_a_folder_and_an_incomplete_memory(tmp_path):
    memory = locas.attach(tiny_model("llama"), width=4).memory
    with pytest.raises(ValueError, match="is a folder, not a memory file"):
        Memory.load(tmp_path)
    path = memory.save(tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    save_file({"up": memory.up.detach(), "tau": memory.tau}, str(tmp_path / "broken.safetensors"), metadata=header)
    with pytest.raises(ValueError, match=r"incomplete locas memory \(missing tensors: \['down'\]\)"):
        Memory.load(tmp_path / "broken.safetensors")


def test_each_memory_of_a_batch_keeps_its_own_tau(tmp_path):
    first, second = random_memory(seed=1), random_memory(seed=2)
    batch = Memory.stack([first, second])
    assert batch.tau.shape == (2, 2, 5)
    x = torch.randn(2, 3, 8)
    together = batch.layer_output(1, x, torch.nn.functional.silu)
    for row, alone in enumerate((first, second)):
        torch.testing.assert_close(
            together[row : row + 1], alone.layer_output(1, x[row : row + 1], torch.nn.functional.silu)
        )
        assert torch.equal(batch.select(row).tau, alone.tau)
    loaded = Memory.load(batch.save(tmp_path / "batch.safetensors"))
    assert torch.equal(loaded.tau, batch.tau)
    assert torch.equal(batch.select(-1).tau, second.tau)
    with pytest.raises(ValueError, match="only memories of the same width can be stacked"):
        Memory.stack([first, random_memory(width=4)])


def test_a_version_1_file_with_one_tau_for_the_batch_still_loads(tmp_path):
    import json

    from safetensors.torch import save_file

    memory = random_memory(batch=2)
    shared = memory.tau[:, 0].contiguous()  # version 1: tau (layers, width), shared by the batch
    tensors = {name: t.detach() for name, t in memory.slot_tensors().items()} | {"tau": shared}
    header = {"locas": json.dumps({**memory.metadata, "format_version": 1, "width": 5, "gated": True})}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=header)
    loaded = Memory.load(tmp_path / "old.safetensors")
    assert loaded.tau.shape == (2, 2, 5) and torch.equal(loaded.tau[:, 1], shared)
    header = {"locas": json.dumps({**memory.metadata, "format_version": 3, "width": 5, "gated": True})}
    save_file(tensors, str(tmp_path / "new.safetensors"), metadata=header)
    with pytest.raises(ValueError, match="format version 3; this locas reads versions 1, 2: update locas"):
        Memory.load(tmp_path / "new.safetensors")
    header = {"locas": json.dumps({**memory.metadata, "width": 5, "gated": True})}
    save_file(tensors, str(tmp_path / "none.safetensors"), metadata=header)
    with pytest.raises(ValueError, match="format version None; .* not a valid locas memory"):
        Memory.load(tmp_path / "none.safetensors")


def test_concat_brings_the_new_slots_to_the_memorys_device():
    memory = random_memory().to("meta")  # stands in for a GPU: slots grown on the CPU join it there
    grown = memory.concat(random_memory(seed=1))
    assert {t.device.type for t in (*grown.slot_tensors().values(), grown.tau)} == {"meta"}


def test_a_memory_keeps_all_its_tensors_where_its_keys_are():
    """memorize gives keys on the model's device and a tau measured there; the meta device stands in for a GPU."""
    parts = random_memory()
    memory = Memory(up=parts.up.detach().to("meta"), gate=parts.gate.detach(), down=parts.down.detach(), tau=parts.tau)
    assert {t.device.type for t in (*memory.slot_tensors().values(), memory.tau)} == {"meta"}


def test_memorize_takes_only_the_chosen_rows_off_the_device(monkeypatch):
    """Cloning a key copies its row, not the whole MLP matrix to the host (2.8 GB for Qwen3-1.7B on a GPU)."""
    model = locas.LocasModel(tiny_model("llama"), tau_rule="output")
    copied = []
    original = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda tensor, *a, **k: copied.append(tensor.numel()) or original(tensor))
    model.memorize(torch.randint(0, 128, (1, 16)), keep_top=4)
    assert max(copied, default=0) < model.model.config.intermediate_size * model.model.config.hidden_size


def test_a_training_forward_reads_each_layer_from_its_current_values_and_the_memory_still_copies():
    """Under grad, the layers' views are cached between forwards: an in-place update and new data must reach
    the next forward, and the gradients must be those of plain indexing."""
    memory, activation = random_memory(layers=3, batch=2), torch.nn.SiLU()
    x = torch.randn(2, 4, 8)

    def total_output(memory):
        return sum(memory.layer_output(layer, x, activation).square().sum() for layer in range(memory.num_layers))

    def fresh_copy():  # a memory of the same values that has run no forward yet
        return Memory(**{n: t.detach().clone() for n, t in memory.slot_tensors().items()}, tau=memory.tau.clone())

    def narrow():
        for tensor in (memory.up, memory.gate, memory.down, memory.tau):
            tensor.data = tensor.data[:, :, :3]

    changes = (
        None,
        lambda: memory.down.data.mul_(2),  # in place: a new version
        lambda: setattr(memory.up, "data", memory.up.data + 1),  # new data
        narrow,  # views of the same data, fewer slots
    )
    for change in changes:
        if change is not None:
            with torch.no_grad():
                change()
        reference = fresh_copy()
        with torch.no_grad():
            expected = total_output(reference)
        expected_grads = torch.autograd.grad(total_output(reference), list(reference.slot_tensors().values()))
        grads = torch.autograd.grad(total_output(memory), list(memory.slot_tensors().values()))
        torch.testing.assert_close(total_output(memory).detach(), expected)
        for grad, expected_grad in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, expected_grad)
    copied = copy.deepcopy(memory)
    buffer = io.BytesIO()
    torch.save(memory, buffer)
    torch.testing.assert_close(copied.up, memory.up)


class _SummedOutput(torch.nn.Module):
    """A memory's summed output over its layers, as a module (for torch.func.functional_call)."""

    def __init__(self, memory: Memory) -> None:
        super().__init__()
        self.memory = memory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = range(self.memory.num_layers)
        return sum(self.memory.layer_output(layer, x, torch.nn.SiLU()).square().sum() for layer in layers)


def test_the_layer_views_are_not_kept_from_inference_mode_nor_across_moves_and_torch_func_still_works():
    summed, x = _SummedOutput(random_memory(layers=2)), torch.randn(1, 4, 8)
    memory = summed.memory
    with torch.inference_mode(), torch.enable_grad():
        summed(x)
    summed(x).backward()  # views made in inference mode would carry no gradient here
    assert memory.down.grad is not None and memory.down.grad.abs().sum() > 0
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        memory.double()  # a swap is refused while other tensors (kept views) still hold the old ones
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert memory.up.dtype == torch.float64 and not memory._unbound
    parameters = {name: tensor.detach() for name, tensor in summed.named_parameters()}
    gradients = torch.func.grad(lambda p: torch.func.functional_call(summed, p, (x.double(),)))(parameters)
    expected = torch.autograd.grad(summed(x.double()), [memory.up, memory.gate, memory.down])
    for name, expected_gradient in zip(("up", "gate", "down"), expected, strict=True):
        torch.testing.assert_close(gradients[f"memory.{name}"], expected_gradient)
