"""to_dense(): concatenate a memory into the MLP weights, giving a vanilla checkpoint.

Gated:   gate' = [gate; gate_m]   up' = [up; up_m]   down' = [down, tau * down_m]
2-layer: up'   = [up; up_m] (zero bias for the new neurons)   down' = [down, tau * down_m]

The new neurons compute exactly the memory's slots, so the merged model equals the memory model. The
concatenation is done in float32 and cast back to the backbone's dtype once.
"""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel

from locas.families import MLPWeights
from locas.initialization import capture_inputs
from locas.memory import Memory
from locas.model import LocasModel, check_memory


def _widen(old: torch.Tensor | None, new_rows: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """Append rows (or zeros for a bias) in float32; None stays None."""
    if old is None:
        return None
    old32 = old.detach().float()
    extra = new_rows if new_rows is not None else old32.new_zeros(width, *old32.shape[1:])
    return torch.cat([old32, extra.to(old32.device)], dim=0)


def to_dense(model: LocasModel, memory: Memory, index: int | None = None) -> PreTrainedModel:
    """A copy of `model`'s backbone whose MLPs are `width` neurons wider and compute `mlp + memory`.

    A memory with a batch of several sequences needs `index` to say which one to merge.
    """
    if not isinstance(model, LocasModel):
        raise TypeError(
            f"to_dense takes a LocasModel, got {type(model).__name__}: wrap the model first, "
            "LocasModel(model) or locas.attach(model)"
        )
    if memory is None:
        raise ValueError("no memory to merge: attach or pass one")
    if (name := memory.non_finite()) is not None:
        raise ValueError(f"this memory's {name} holds NaN or inf (its training diverged): it cannot be merged")
    if memory.batch_size > 1 and index is None:
        raise ValueError(
            f"this memory holds {memory.batch_size} sequences' memories; pass index=0..{memory.batch_size - 1} "
            "to merge one of them"
        )
    if index is not None:
        memory = memory.select(index)
    check_memory(memory, model.model)

    with model.hooks_removed() as backbone:
        dense = copy.deepcopy(backbone)
    family = model.family
    width = memory.width
    for layer, mlp in enumerate(family.mlps(dense)):
        weights = family.read(mlp)
        dtype = weights.up.dtype
        values = (memory.down[layer, 0] * memory.tau[layer, 0].unsqueeze(-1)).detach().float()  # (width, hidden)
        if layer not in model.memory_layers:  # the memory model ignores these slots: so does the merge
            values = torch.zeros_like(values)
        widened = MLPWeights(
            up=_widen(weights.up, memory.up[layer, 0].detach().float(), width),
            gate=_widen(weights.gate, None if memory.gate is None else memory.gate[layer, 0].detach().float(), width),
            down=_widen(weights.down.T, values, width).T,
            up_bias=_widen(weights.up_bias, None, width),
            gate_bias=_widen(weights.gate_bias, None, width),
            down_bias=None if weights.down_bias is None else weights.down_bias.detach().float(),
        )
        family.write(mlp, MLPWeights(**{k: None if v is None else v.to(dtype) for k, v in vars(widened).items()}))
    mlp_width = family.read(family.mlps(dense)[0]).up.shape[0]
    setattr(dense.config, family.width_field, mlp_width)
    dense.requires_grad_(False)
    return dense


@torch.no_grad()
def merge_error(model: LocasModel, dense: PreTrainedModel, input_ids: torch.Tensor, memory: Memory) -> float:
    """How far `dense` (from `to_dense(model, memory)`) is from the memory model, layer by layer: the largest
    difference between each dense MLP and the frozen MLP plus `memory`, computed in float32 on the inputs the
    layer sees for `input_ids`, relative to the layer output's largest entry (~1e-7 for an exact merge).

    Both run the memory's weights rounded to the backbone's dtype, as the hook and the merge do. In half precision
    whole-model logits cannot prove a merge: the memory model adds two rounded outputs where the dense one rounds
    one wider product, which moves bfloat16 logits about as much as an untrained memory does.
    """
    family, dtype = model.family, next(model.model.parameters()).dtype
    check_memory(memory, model.model)
    memory = memory.to(model.device)  # (in place, as `using` would)
    rounded = Memory(
        up=memory.up.detach().to(dtype).float(),
        gate=None if memory.gate is None else memory.gate.detach().to(dtype).float(),
        down=(memory.down.detach() * memory.tau.unsqueeze(-1)).to(dtype).float(),
        tau=torch.ones_like(memory.tau),
    )
    mlps = family.mlps(model.model)
    with model.using(memory), capture_inputs(mlps) as inputs:
        model(input_ids=input_ids.to(model.device), use_cache=False)
    worst = 0.0
    for layer, (mlp, dense_mlp) in enumerate(zip(mlps, family.mlps(dense), strict=True)):
        x = inputs[layer].float()
        frozen = copy.deepcopy(mlp).float()  # the copy's memory hook is inert: the bare MLP
        expected = frozen(x)
        if layer in model.memory_layers:
            expected = expected + rounded.layer_output(layer, x, family.activation(frozen))
        difference = (copy.deepcopy(dense_mlp).float()(x) - expected).abs().max()
        worst = max(worst, (difference / expected.abs().max().clamp_min(1e-12)).item())
    return worst
