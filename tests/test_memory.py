import pytest
import torch
from conftest import TINY_CONFIGS, tiny_model
from safetensors.torch import save_file
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
