"""memorize(): initialise a memory from one forward pass of the frozen backbone.

Neuron j of layer l is scored by its mean absolute intermediate activation (the input of the MLP's
output projection) over the non-padding tokens, leaving out a prefix such as `<bos>` (run, not scored);
the chosen neurons' key (and gate) rows are cloned, normalised to unit length, and the values start at
zero, so the model is unchanged until trained.
"""

from __future__ import annotations

import numbers
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from locas.config import MEMORY_INITS
from locas.memory import Memory
from locas.model import check_token_ids, token_nll

if TYPE_CHECKING:
    from locas.model import LocasModel


def _normalize(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, prefix_length: int = 0) -> torch.Tensor:
    """1.0 at the tokens that count: not padding, not among each row's first `prefix_length`."""
    if attention_mask is None:
        mask = torch.ones_like(input_ids, dtype=torch.float32)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
        )
    else:
        mask = attention_mask.to(torch.float32, copy=True)
    mask[:, :prefix_length] = 0  # a prefix like <bos> draws huge activations (attention sinks), not the text's
    return mask


def _check_model_and_width(model: LocasModel, width: int) -> None:
    from locas.model import LocasModel

    if not isinstance(model, LocasModel):
        raise TypeError(
            f"a memory is made for a LocasModel, got {type(model).__name__}: wrap the model first, "
            "LocasModel(model).memorize(...) (which also attaches the memory)"
        )
    if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width <= 0:
        raise ValueError(f"memory width (keep_top) must be a positive integer, got {width!r}")


def _check_inputs(
    model: LocasModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, width: int, memory_init: str
) -> None:
    _check_model_and_width(model, width)
    if memory_init not in MEMORY_INITS:
        raise ValueError(f"unknown memory_init {memory_init!r}; choose one of {', '.join(MEMORY_INITS)}")
    check_token_ids(model.model, input_ids, attention_mask)


@contextmanager
def capture_inputs(modules: list[torch.nn.Module]):
    """Record the first positional input of each module on every forward call."""
    captured: list[torch.Tensor | None] = [None] * len(modules)

    def make_hook(index: int):
        def hook(module, args):
            captured[index] = args[0]

        return hook

    handles = [module.register_forward_pre_hook(make_hook(i)) for i, module in enumerate(modules)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class BackbonePass:
    """What memorize reads from one no-grad forward of the bare backbone, per layer: the mean |intermediate
    activation| of each neuron over the tokens that count, (layers, batch, mlp_width) float32; and, when asked
    for (`keep_inputs`), each layer's MLP inputs and the norms of its MLP outputs, for `measured_tau`."""

    neuron_scores: torch.Tensor
    mlp_inputs: list[torch.Tensor] | None = None  # per layer (batch, seq, hidden)
    mlp_output_norms: list[torch.Tensor] | None = None  # per layer (batch, seq), float32


def backbone_pass(
    model: LocasModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    prefix_length: int = 0,
    keep_inputs: bool = False,
) -> BackbonePass:
    """Run the bare backbone once on `input_ids` (no grad) and record a `BackbonePass`. The tokens that count
    are each sequence's non-padding tokens after its first `prefix_length` (seen by the backbone, not scored)."""
    mask = _token_mask(input_ids, attention_mask, prefix_length).to(model.device)
    mlps = model.family.mlps(model.model)
    sums: list[torch.Tensor | None] = [None] * len(mlps)
    inputs: list[torch.Tensor | None] = [None] * len(mlps)
    output_norms: list[torch.Tensor | None] = [None] * len(mlps)

    def record_activations(layer: int):
        def hook(module, args):
            sums[layer] = (args[0].float().abs() * mask.unsqueeze(-1)).sum(dim=1)

        return hook

    def record_mlp(layer: int):
        def hook(module, args, output):
            inputs[layer], output_norms[layer] = args[0], output.float().norm(dim=-1)

        return hook

    handles = [
        model.family.down_module(mlp).register_forward_pre_hook(record_activations(i)) for i, mlp in enumerate(mlps)
    ]
    if keep_inputs:
        handles += [mlp.register_forward_hook(record_mlp(i)) for i, mlp in enumerate(mlps)]
    try:
        with torch.no_grad(), model.using(None):
            model.model.base_model(
                input_ids=input_ids.to(model.device),
                attention_mask=None if attention_mask is None else attention_mask.to(model.device),
                use_cache=False,
            )
    finally:
        for handle in handles:
            handle.remove()
    scores = torch.stack(sums) / mask.sum(dim=1).clamp_min(1).unsqueeze(-1)
    if not keep_inputs:
        return BackbonePass(scores)
    return BackbonePass(scores, inputs, output_norms)


def neuron_scores(
    model: LocasModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, prefix_length: int = 0
) -> torch.Tensor:
    """Mean |intermediate activation| per neuron over each sequence's non-padding tokens after its first
    `prefix_length` (which the backbone sees but which are not scored).

    Runs the bare backbone once, without grad. Shape (layers, batch, mlp_width), float32.
    """
    return backbone_pass(model, input_ids, attention_mask, prefix_length).neuron_scores


def _random_keys(model: LocasModel, width: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(seed)
    shape = (model.num_layers, batch_size, width, model.model.config.hidden_size)
    up = _normalize(torch.randn(shape, generator=generator))
    gate = _normalize(torch.randn(shape, generator=generator)) if model.family.gated else None
    return up, gate


def random_memory(model: LocasModel, width: int, batch_size: int = 1, seed: int = 0) -> Memory:
    """Gaussian unit-norm keys (and gates), zero values: no cloning. (The `output` tau rule needs a text:
    `memorize(..., memory_init="random")`.)"""
    _check_model_and_width(model, width)
    up, gate = _random_keys(model, width, batch_size, seed)
    return Memory(
        up=up,
        gate=gate,
        down=torch.zeros_like(up),
        tau=model.default_tau(width),
        metadata=model.new_metadata("random", 0),
    )


def measured_tau(
    model: LocasModel,
    memory: Memory,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    prefix_length: int = 0,
    recorded: BackbonePass | None = None,
) -> torch.Tensor:
    """tau under the `output` rule for `memory`'s keys, shape (layers, batch, width): per layer and memory,
    `model.output_ratio * median_t ||mlp(x_t)|| / median_t sum_j |act_j(x_t)|`, so that the memory with every value
    vector at unit norm and aligned adds `output_ratio` times the layer's typical MLP output. Medians over the
    tokens that count (as in `neuron_scores`; a batch-1 memory pools every row), on the bare backbone (one
    forward pass, no grad). The same value for every slot of a layer; on the device of `memory`'s tensors. Slots
    grown later (`Memory.concat`) are measured on their own, so each group of slots gets this budget. `recorded`:
    a `backbone_pass` of the same text with its MLP inputs kept, read instead of running one."""
    if memory.batch_size not in (1, input_ids.shape[0]):
        raise ValueError(
            f"a memory with batch {memory.batch_size} cannot be measured on {input_ids.shape[0]} sequences; "
            "use a memory of batch 1 or one memory per sequence"
        )
    device = model.device
    mask = _token_mask(input_ids, attention_mask, prefix_length).to(device).bool()
    rows = torch.arange(mask.shape[0], device=device).unsqueeze(1)
    groups = [mask] if memory.batch_size == 1 else [mask & (rows == b) for b in range(memory.batch_size)]
    if empty := [b for b, group in enumerate(groups) if not group.any()]:
        raise ValueError(f"sequence {empty[0]} has no token (after padding and prefix) to measure tau on")
    keys = Memory(  # on the model's device, leaving the caller's memory where it is
        up=memory.up.detach().to(device),
        gate=None if memory.gate is None else memory.gate.detach().to(device),
        down=memory.down.detach().to(device),
        tau=memory.tau.to(device),
    )
    if recorded is None:
        recorded = backbone_pass(model, input_ids, attention_mask, prefix_length, keep_inputs=True)
    elif recorded.mlp_inputs is None or recorded.mlp_inputs[0].shape[:2] != input_ids.shape:
        raise ValueError(
            "recorded must be a backbone_pass of these input_ids with keep_inputs=True "
            f"(input_ids {tuple(input_ids.shape)})"
        )
    norms = []  # per layer: ||mlp(x)||, sum_j |act_j(x)|
    with torch.no_grad():
        for layer, (mlp, x) in enumerate(zip(model.family.mlps(model.model), recorded.mlp_inputs, strict=True)):
            serving = None if keys.batch_size == 1 else torch.arange(x.shape[0], device=x.device)
            activations = keys.slot_activations(layer, x, model.family.activation(mlp), serving)
            norms.append((recorded.mlp_output_norms[layer], activations.float().abs().sum(dim=-1)))
    tau = torch.tensor(
        [
            [(output[group].median() / summed[group].median().clamp_min(1e-12)).item() for group in groups]
            for output, summed in norms
        ]
    )  # (layers, batch)
    return (model.output_ratio * tau).unsqueeze(-1).expand(-1, -1, memory.width).to(memory.up.device).contiguous()


def _finish(
    model: LocasModel,
    memory: Memory,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prefix_length: int,
    recorded: BackbonePass | None = None,
) -> Memory:
    """`memory` (made with a placeholder tau under the `output` rule) with its tau measured on the text, and no
    values in the layers the model does not run it in (`LocasModel.memory_layers`)."""
    if model.tau_rule == "output":
        memory.tau = measured_tau(model, memory, input_ids, attention_mask, prefix_length, recorded)
    unused = [layer for layer in range(memory.num_layers) if layer not in model.memory_layers]
    with torch.no_grad():
        memory.down[unused] = 0
    return memory


def _initial_tau(model: LocasModel, width: int) -> torch.Tensor:
    """The rule's tau; under `output` ones, until `_finish` measures it."""
    return torch.ones(model.num_layers, width) if model.tau_rule == "output" else model.default_tau(width)


def select_neurons(scores: torch.Tensor, width: int, memory_init: str, seed: int = 0) -> torch.Tensor:
    """Indices (layers, batch, width) of the neurons to clone, from scores (layers, batch, mlp_width)."""
    mlp_width = scores.shape[-1]
    if width > mlp_width:
        raise ValueError(
            f"cannot clone {width} neurons from an MLP of {mlp_width}; use a width (keep_top) <= {mlp_width}"
        )
    if memory_init == "highest":
        return scores.topk(width, dim=-1).indices
    if memory_init == "lowest":
        return scores.topk(width, dim=-1, largest=False).indices
    generator = torch.Generator().manual_seed(seed)
    layers, batch, _ = scores.shape
    return torch.stack([torch.randperm(mlp_width, generator=generator)[:width] for _ in range(layers * batch)]).view(
        layers, batch, width
    )


def memorize(
    model: LocasModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    keep_top: int = 64,
    memory_init: str = "highest",
    per_sequence: bool = False,
    seed: int = 0,
    gradient_scale: float = 1.0,
    prefix_length: int = 0,
) -> Memory:
    """Build a memory of `keep_top` slots per layer from the text in `input_ids` (batch, seq).

    memory_init: `highest` / `lowest` clone the neurons with the largest / smallest mean |activation|,
    `random_index` clones random neurons (seeded), `random` makes Gaussian keys without cloning, and
    `gradient` (2-layer-MLP families) stores the `keep_top` highest-loss tokens as slots: key = the
    token's normalised MLP input, value = `gradient_scale` * the gradient of log p(next token) with
    respect to each layer's MLP output, normalised jointly over layers. With `per_sequence` each
    sequence gets its own memory (batch axis); otherwise all non-padding tokens make one memory. The first
    `prefix_length` tokens of every row (`data.window_prefix`, e.g. `<bos>`) are run but not scored.
    Returns the memory without attaching it: `LocasModel.memorize` attaches.
    """
    _check_inputs(model, input_ids, attention_mask, keep_top, memory_init)
    if not 0 <= prefix_length < input_ids.shape[1]:
        raise ValueError(
            f"prefix_length {prefix_length} leaves no token of the {input_ids.shape[1]}-token rows to score; "
            "it must be >= 0 and less than the row length"
        )
    if memory_init == "gradient" and prefix_length:
        raise ValueError("memory_init='gradient' takes no prefix (its 2-layer-MLP families put no <bos> first)")
    tokens = int(_token_mask(input_ids, attention_mask, prefix_length).sum())
    batch_size = input_ids.shape[0] if per_sequence else 1
    recorded = None
    if memory_init == "random":
        up, gate = _random_keys(model, keep_top, batch_size, seed)
    elif memory_init == "gradient":
        memory = _gradient_memory(model, input_ids, attention_mask, keep_top, per_sequence, gradient_scale)
        return _finish(model, memory, input_ids, attention_mask, prefix_length)
    else:
        # One forward gives the neuron scores and, under the output rule, what measuring tau reads.
        recorded = backbone_pass(
            model, input_ids, attention_mask, prefix_length, keep_inputs=model.tau_rule == "output"
        )
        up, gate = _cloned_keys(
            model,
            recorded.neuron_scores,
            input_ids,
            attention_mask,
            keep_top,
            memory_init,
            per_sequence,
            seed,
            prefix_length,
        )
    memory = Memory(
        up=up,
        gate=gate,
        down=torch.zeros_like(up),
        tau=_initial_tau(model, keep_top),
        metadata=model.new_metadata(memory_init, tokens),
    )
    return _finish(model, memory, input_ids, attention_mask, prefix_length, recorded)


def _cloned_keys(
    model: LocasModel,
    scores: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    width: int,
    memory_init: str,
    per_sequence: bool,
    seed: int,
    prefix_length: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unit-norm key (and gate) rows of the neurons `memory_init` picks from their `scores` (as
    `neuron_scores`), (layers, batch, width, hidden)."""
    if not per_sequence:  # one memory from every token: weight each sequence by its token count
        counts = _token_mask(input_ids, attention_mask, prefix_length).sum(dim=1).to(scores.device)
        scores = (scores * counts.unsqueeze(-1)).sum(dim=1, keepdim=True) / counts.sum().clamp_min(1)
    chosen = select_neurons(scores.cpu(), width, memory_init, seed)

    ups, gates = [], []
    for layer, mlp in enumerate(model.family.mlps(model.model)):
        weights = model.family.read(mlp)
        rows = chosen[layer].to(weights.up.device)  # only the chosen rows leave their device
        ups.append(_normalize(weights.up.detach()[rows].float()).to(model.device))
        if weights.gate is not None:
            gates.append(_normalize(weights.gate.detach()[rows].float()).to(model.device))
    return torch.stack(ups), torch.stack(gates) if gates else None


def _gradient_memory(
    model: LocasModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    width: int,
    per_sequence: bool,
    scale: float,
) -> Memory:
    if model.family.gated:
        raise ValueError(
            f"memory_init='gradient' is for 2-layer-MLP families (gpt2, gpt_neox); {model.family.name} is gated: "
            "use highest, lowest, random_index or random"
        )
    device = model.device
    input_ids = input_ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    target_mask = _token_mask(input_ids, attention_mask).to(device)[:, 1:]
    mlps = model.family.mlps(model.model)
    offsets = [
        torch.zeros(*input_ids.shape, model.model.config.hidden_size, device=device, requires_grad=True) for _ in mlps
    ]

    def make_hook(layer: int):
        def hook(module, args, output):
            return output + offsets[layer].to(output.dtype)

        return hook

    handles = [mlp.register_forward_hook(make_hook(i)) for i, mlp in enumerate(mlps)]
    try:
        with model.using(None), capture_inputs(mlps) as inputs:
            logits = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            keys_per_layer = [x.detach().float() for x in inputs]
    finally:
        for handle in handles:
            handle.remove()
    nll = token_nll(logits, input_ids)
    nll = torch.where(target_mask > 0, nll, torch.full_like(nll, -torch.inf))

    # Choose the highest-loss positions (per sequence, or over the whole batch).
    candidates = int((target_mask > 0).sum(dim=1).min()) if per_sequence else int((target_mask > 0).sum())
    if width > candidates:
        raise ValueError(
            f"memory_init='gradient' makes one slot per token: {width} slots need at least {width} "
            f"predicted tokens, the text has {candidates}"
        )
    flat = nll.detach() if per_sequence else nll.detach().reshape(1, -1)
    positions = flat.topk(width, dim=-1).indices  # (memories, width)

    (-nll[torch.isfinite(nll)].sum()).backward()
    gradients = torch.stack([offset.grad[:, :-1].float() for offset in offsets])  # (L, B, T-1, d)
    keys = torch.stack([k[:, :-1] for k in keys_per_layer])  # (L, B, T-1, d)
    if not per_sequence:
        gradients = gradients.reshape(gradients.shape[0], 1, -1, gradients.shape[-1])
        keys = keys.reshape(keys.shape[0], 1, -1, keys.shape[-1])
    index = positions.unsqueeze(0).unsqueeze(-1).expand(keys.shape[0], -1, -1, keys.shape[-1])
    chosen_keys = torch.gather(keys, 2, index)
    chosen_gradients = torch.gather(gradients, 2, index)
    joint_norm = chosen_gradients.pow(2).sum(dim=(0, 3), keepdim=True).sqrt().clamp_min(1e-12)
    return Memory(
        up=_normalize(chosen_keys),
        down=scale * chosen_gradients / joint_norm,
        tau=_initial_tau(model, width),
        metadata=model.new_metadata("gradient", int(_token_mask(input_ids, attention_mask).sum())),
    )
