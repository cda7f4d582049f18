"""Attach a memory to a HuggingFace causal LM: every layer computes `mlp(x) + memory(x)`.

The memory runs in a forward hook on each decoder layer's MLP module, so the backbone's own modules,
weights and state dict are untouched and the KV cache, `generate` and every attention backend keep
working. `LocasModel.memory = None` (or a zero-valued memory) gives exactly the backbone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import PreTrainedModel

from locas.config import TAU_RULES
from locas.families import MLPFamily, family_of
from locas.memory import Memory


def base_fingerprint(model: PreTrainedModel) -> str:
    """A short hash of the architecture a memory depends on (type, sizes, layer count, MLP width)."""
    family = family_of(model)
    mlps = family.mlps(model)
    fields = {
        "model_type": model.config.model_type,
        "hidden_size": model.config.hidden_size,
        "num_layers": len(mlps),
        "mlp_width": mlp_width(model),
        "vocab_size": model.config.vocab_size,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def mlp_width(model: PreTrainedModel) -> int:
    """Neurons per MLP of `model` (its first layer's)."""
    family = family_of(model)
    return family.read(family.mlps(model)[0]).up.shape[0]


def base_description(model: PreTrainedModel) -> str:
    family = family_of(model)
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    return (
        f"{name!r} ({model.config.model_type}, {len(family.mlps(model))} layers, hidden {model.config.hidden_size}, "
        f"MLP width {mlp_width(model)}, fingerprint {base_fingerprint(model)})"
    )


def output_scales(model: PreTrainedModel) -> torch.Tensor:
    """Per layer, the mean norm of the backbone MLP's per-neuron output vectors, shape (layers,)."""
    family = family_of(model)
    return torch.stack([family.read(mlp).down.detach().float().norm(dim=0).mean() for mlp in family.mlps(model)])


def weight_signature(model: PreTrainedModel, count: int = 16) -> torch.Tensor:
    """Per layer, `count` values of the MLP's down projection at fixed, evenly spread positions, shape
    (layers, count), float32 on the CPU: unlike `output_scales`, it tells apart two inits of the same config."""
    family = family_of(model)
    rows = []
    for mlp in family.mlps(model):
        down = family.read(mlp).down.detach().reshape(-1)
        rows.append(down[spread_positions(down.numel(), count).to(down.device)].float().cpu())
    return torch.stack(rows)


def spread_positions(size: int, count: int) -> torch.Tensor:
    """`count` evenly spread positions in 0..size-1, the first and the last included, computed in integers (a
    float32 linspace rounds past the end of a tensor of more than 2^24 numbers)."""
    return torch.arange(count, dtype=torch.long) * (size - 1) // max(count - 1, 1)


def check_token_ids(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    name: str = "input_ids",
) -> None:
    """Refuse token ids `model` cannot read, naming the problem and the fix: not a tensor (TypeError), not
    integers, not (batch, seq), ids outside the vocabulary, more tokens than learned positions (GPT-2's
    `n_positions`), or an attention mask of another shape (ValueError)."""
    if not isinstance(input_ids, torch.Tensor):
        hint = (
            f"pass encoding['{name}']"
            if hasattr(input_ids, "keys")
            else "make a tensor: torch.tensor([ids]) for one list of ids, torch.tensor(rows) for equal-length rows"
        )
        raise TypeError(f"{name} must be a tensor of token ids, got {type(input_ids).__name__}; {hint}")
    if input_ids.dtype != torch.long:
        raise ValueError(f"{name} must be token ids of dtype torch.long, got {input_ids.dtype}; use {name}.long()")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        hint = f"; add the batch axis: {name}.unsqueeze(0)" if input_ids.dim() == 1 else ""
        raise ValueError(f"{name} must have shape (batch, seq) with seq >= 1, got {tuple(input_ids.shape)}{hint}")
    vocabulary = model.get_input_embeddings().num_embeddings
    if input_ids.numel():
        lowest, highest = (int(value) for value in torch.aminmax(input_ids))
        if not 0 <= lowest <= highest < vocabulary:
            raise ValueError(
                f"{name} hold ids outside the model's vocabulary 0..{vocabulary - 1} (min {lowest}, max {highest}): "
                "tokenize with the model's own tokenizer"
            )
    learned, _ = positions(model)  # learned position embeddings (GPT-2): a hard limit
    if learned is not None and input_ids.shape[1] > learned:
        raise ValueError(
            f"{input_ids.shape[1]} tokens in a sequence, but this model has {learned} positions "
            "(config.n_positions); use shorter windows"
        )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}: "
            "they must match"
        )


def token_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token NLL of `input_ids[:, 1:]` given `logits[:, :-1]`, shape (batch, seq - 1), in float32.

    Positions whose target is padding hold 0.
    """
    nll = target_nll(logits[:, :-1], input_ids[:, 1:])
    if attention_mask is not None:
        nll = nll * attention_mask[:, 1:].to(nll.dtype)
    return nll


def target_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(`logits`)[target] over the last axis, in float32: `F.cross_entropy(reduction="none")` that
    makes one logits-sized float32 buffer instead of three to four (cross-entropy's log-softmax, a float32 cast
    of low-precision logits, and in backward nll_loss's zero-filled gradient and log-softmax's own). On a CPU,
    faulting those buffers in took 0.1-0.4 s of a 5.5 s step of the embedded model."""
    return _TargetNLL.apply(logits, targets)


class _TargetNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        ctx.save_for_backward(log_probs, targets)
        ctx.logits_dtype = logits.dtype
        return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_nll: torch.Tensor) -> tuple[torch.Tensor, None]:
        log_probs, targets = ctx.saved_tensors
        # d nll / d logits = softmax - one_hot(target), written over the saved log-probabilities (a second
        # backward through the same graph is refused by autograd's check of saved tensors' versions).
        grad = log_probs.exp_().mul_(grad_nll.unsqueeze(-1))
        grad.scatter_add_(-1, targets.unsqueeze(-1), -grad_nll.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None


@dataclass
class PrefixCache:
    """The KV cache of a token prefix that many inputs share (computed once, copied for each use)."""

    ids: list[int]
    cache: object
    keyword: str  # the cache's argument name: `cache` in recent transformers, `past_key_values` before


@torch.no_grad()
def encode_prefix(model: PreTrainedModel, ids: list[int]) -> PrefixCache:
    """Run `ids` once and keep their KV cache (pass a `copy.deepcopy` of `.cache` as `.keyword`: a forward
    extends the cache it is given)."""
    output = model(input_ids=torch.tensor([ids], device=model.device), use_cache=True, logits_to_keep=1)
    keyword = "cache" if "cache" in output else "past_key_values"
    return PrefixCache(ids, output[keyword], keyword)


_PACKAGE_DIR = str(Path(__file__).parent) + os.sep


def _user_stacklevel() -> int:
    """The `warnings.warn` stacklevel, for its caller, of the innermost frame outside the locas package (the call
    into locas that the user wrote, however deep inside locas the warning is raised)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def positions(model: PreTrainedModel) -> tuple[int | None, int | None]:
    """(learned positions, a hard limit: GPT-2's n_positions; or the positions a rotary model was trained on, past
    which it runs on, extrapolating: max_position_embeddings). One of the two is None."""
    learned = getattr(model.config, "n_positions", None)
    return learned, None if learned is not None else getattr(model.config, "max_position_embeddings", None)


def warn_if_float16(model: PreTrainedModel) -> None:
    """Warn that training through a float16 backbone may lose its gradients: nothing scales the loss here."""
    if next(model.parameters()).dtype == torch.float16:
        warnings.warn(
            "training through a float16 backbone: without loss scaling, small gradients underflow to zero in "
            "float16; load the model in bfloat16 (or float32) instead",
            stacklevel=_user_stacklevel(),
        )


# `locas.memorize(model, ids)` returns a memory without attaching it
NO_MEMORY = (
    "no memory attached: make one with locas_model.memorize(input_ids, ...) (it attaches the memory it makes), "
    "or attach one with locas_model.attach_memory(memory) (e.g. the one locas.memorize returned)"
)


class MemoryHook:
    """The forward hook that adds a LocasModel's memory to one MLP's output.

    A copy of a hooked module (copy.deepcopy, or torch.save then torch.load) gets an inert hook that references
    nothing: the copy runs its bare MLP, does not keep the original alive, and a LocasModel made on it drops the
    inert hook.
    """

    def __init__(self, locas_model: LocasModel | None, layer: int, mlp: nn.Module | None) -> None:
        self.locas_model = locas_model
        self.layer = layer
        self.mlp = None if mlp is None else weakref.ref(mlp)
        self.activation = None if locas_model is None else locas_model.family.activation(mlp)

    def hooks(self, mlp: nn.Module) -> bool:
        """Whether this hook runs a memory on `mlp`."""
        return self.locas_model is not None and self.mlp() is mlp

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        locas_model = self.locas_model
        if locas_model is None or locas_model.memory is None or module is not self.mlp():
            return output
        x = args[0] if args else next(iter(kwargs.values()))
        return output + locas_model.memory.layer_output(self.layer, x, self.activation, locas_model.rows)

    def __reduce__(self) -> tuple:
        return MemoryHook, (None, self.layer, None)


def _memory_hooks(mlp: nn.Module) -> dict[int, MemoryHook]:
    """The memory hooks `mlp` carries, by hook id."""
    return {key: hook for key, hook in mlp._forward_hooks.items() if isinstance(hook, MemoryHook)}


def _remove_copied_hooks(mlp: nn.Module) -> None:
    """Drop the inert hooks `mlp` carries as a copy of a hooked module."""
    for key, hook in _memory_hooks(mlp).items():
        if not hook.hooks(mlp):
            for hooks in (mlp._forward_hooks, mlp._forward_hooks_with_kwargs, mlp._forward_hooks_always_called):
                hooks.pop(key, None)


def check_memory_shape(memory: Memory, model: PreTrainedModel) -> None:
    """Raise ValueError, naming both, if `memory` was made for another base model than `model` (its layers, sizes,
    gating or architecture fingerprint differ); cheap enough for every use of a memory."""
    family = family_of(model)
    stored = memory.metadata.get("fingerprint")
    same_shape = (memory.num_layers, memory.hidden_size, memory.gated) == (
        len(family.mlps(model)),
        model.config.hidden_size,
        family.gated,
    )
    if not same_shape or (stored is not None and stored != base_fingerprint(model)):
        mlp_width = f"MLP width {memory.metadata['mlp_width']}, " if "mlp_width" in memory.metadata else ""
        made_for = (
            f"{memory.metadata.get('base_model', '?')!r} ({memory.metadata.get('family', '?')}, "
            f"{memory.num_layers} layers, hidden {memory.hidden_size}, {mlp_width}fingerprint {stored})"
        )
        raise ValueError(
            f"this memory was made for {made_for} but the model is {base_description(model)}; "
            "load it onto the base model it was made for"
        )


def check_memory(memory: Memory, model: PreTrainedModel) -> None:
    """Raise ValueError, naming both, if `memory` was made for another base model than `model`; warn if it was made
    for other weights of the same architecture."""
    check_memory_shape(memory, model)
    # Same architecture, other weights (another init or a retrained checkpoint; a light fine-tune can stay within
    # the tolerances): allowed, but said.
    stored_scales = memory.metadata.get("output_scales")
    stored_signature = memory.metadata.get("weight_signature")  # absent from older files
    differs = stored_scales is not None and not torch.allclose(
        torch.tensor(stored_scales, dtype=torch.float32), output_scales(model).cpu(), rtol=1e-2
    )
    if stored_signature is not None:
        signature = torch.tensor(stored_signature, dtype=torch.float32)
        # A bfloat16 or float16 copy of the same weights moves them by < 0.4%; other weights, by ~100%.
        drift = (weight_signature(model, signature.shape[1]) - signature).norm(dim=1)
        differs = differs or bool((drift > 1e-2 * signature.norm(dim=1)).any())
    if differs:
        warnings.warn(
            f"this memory was made for {memory.metadata.get('base_model', '?')!r}, whose MLP weights differ "
            f"from those of {base_description(model)}; it may not transfer",
            stacklevel=_user_stacklevel(),
        )


class LocasModel(nn.Module):
    """A frozen causal LM plus an optional Memory added to every layer's MLP output.

    `tau_rule` (see `TAU_RULES`) sets the output scale of the memories made for it (memorize, attach);
    `output_ratio` is the `output` rule's bound on the memory's output relative to the MLP's. `memory_layers`
    (default: all) are the decoder layers whose MLP runs the memory: the others ignore their slots, so a training
    backward pass stops at the lowest of them (`to_dense` merges the same layers only).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        memory: Memory | None = None,
        tau_rule: str = "paper",
        output_ratio: float = 0.1,
        memory_layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if tau_rule not in TAU_RULES:
            raise ValueError(f"unknown tau rule {tau_rule!r}; choose one of {', '.join(TAU_RULES)}")
        if not (output_ratio > 0 and math.isfinite(output_ratio)):
            raise ValueError(f"output_ratio must be a positive number, got {output_ratio}")
        self.tau_rule = tau_rule
        self.output_ratio = output_ratio
        self.family: MLPFamily = family_of(model)
        layers = len(self.family.mlps(model))
        self.memory_layers = list(range(layers)) if memory_layers is None else sorted(set(memory_layers))
        if not self.memory_layers or not all(0 <= layer < layers for layer in self.memory_layers):
            raise ValueError(f"memory_layers must be some of the model's layers 0..{layers - 1}, got {memory_layers}")
        if model.get_output_embeddings() is None:
            raise ValueError(
                f"{type(model).__name__} has no language-model head: load the causal LM, e.g. "
                "AutoModelForCausalLM.from_pretrained(...)"
            )
        if any(parameter.is_meta for parameter in model.parameters()):
            raise ValueError(
                "the model's weights are on the meta device (made without data, e.g. under init_empty_weights, or "
                "offloaded to disk by a device_map); load them first, e.g. AutoModelForCausalLM.from_pretrained(...)"
            )
        for mlp in self.family.mlps(model):
            _remove_copied_hooks(mlp)
        if LocasModel.wrapping(model) is not None:  # two memories would add up, silently
            raise ValueError(
                "this model already carries a LocasModel's memory hooks; call .detach() on that LocasModel first "
                "(LocasModel.wrapping(model).detach() if you no longer hold it), or keep using it"
            )
        self.model = model
        self.model.requires_grad_(False)
        self._backbone_was_training = model.training
        self.model.eval()  # a frozen backbone: no dropout noise in scores or in the memory's gradients
        self.memory: Memory | None = None
        self.rows: torch.Tensor | None = None  # which of the memory's batch serve the input's sequences
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._detached = False
        self._install_hooks()
        if memory is not None:
            try:
                self.attach_memory(memory)
            except BaseException:
                self.detach()  # leave no hooks behind on a model the caller keeps
                raise

    @staticmethod
    def wrapping(model: PreTrainedModel) -> LocasModel | None:
        """The LocasModel whose memory hooks `model` carries, or None."""
        for mlp in family_of(model).mlps(model):
            for hook in _memory_hooks(mlp).values():
                if hook.hooks(mlp):
                    return hook.locas_model
        return None

    # --- hooks -------------------------------------------------------------------------------

    def _install_hooks(self) -> None:
        mlps = self.family.mlps(self.model)
        for layer in self.memory_layers:
            hook = MemoryHook(self, layer, mlps[layer])
            self._hooks.append(mlps[layer].register_forward_hook(hook, with_kwargs=True))

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    @contextmanager
    def hooks_removed(self) -> Iterator[PreTrainedModel]:
        """The bare backbone for the duration of the block (e.g. to copy it)."""
        installed = bool(self._hooks)  # an inner block (e.g. to_dense inside one) leaves them to the outer one
        self._remove_hooks()
        try:
            yield self.model
        finally:
            if installed and not self._detached:
                self._install_hooks()

    def detach(self) -> PreTrainedModel:
        """Remove the memory's hooks for good and return the untouched backbone (in the train or eval mode it
        had when wrapped)."""
        self._remove_hooks()
        self._detached = True
        self.memory = None
        self.model.train(self._backbone_was_training)
        return self.model

    def __reduce__(self) -> tuple:
        """Copied (copy.deepcopy) and pickled (torch.save) as a LocasModel on a copy of the backbone, with a copy
        of the memory (`rows`, modes and detachment kept)."""
        options = {"tau_rule": self.tau_rule, "output_ratio": self.output_ratio, "memory_layers": self.memory_layers}
        state = (self.rows, self.training, self.model.training, self._backbone_was_training, self._detached)
        return _rebuilt_locas_model, (self.model, self.memory, options, state)

    def __copy__(self) -> LocasModel:
        raise TypeError(
            "a LocasModel cannot be copied shallowly (two of them on one backbone would add the memory twice); "
            "use copy.deepcopy, which copies the backbone too"
        )

    @contextmanager
    def using(self, memory: Memory | None) -> Iterator[LocasModel]:
        """Temporarily run with `memory` (None: the bare backbone), checked against the backbone."""
        if memory is not None:
            self._check_usable(memory)
        previous = self.memory
        self.memory = memory
        try:
            yield self
        finally:
            self.memory = previous

    @contextmanager
    def serving(self, rows: list[int] | None) -> Iterator[LocasModel]:
        """Run the input's sequences with memories `rows` of the attached batch (None: all, in order)."""
        previous = self.rows
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long, device=self.device)
        try:
            yield self
        finally:
            self.rows = previous

    # --- running the model -------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def num_layers(self) -> int:
        return len(self.family.layers(self.model))

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """`model.generate` with the attached memory active (KV cache included). With a batched memory, each
        prompt's beams and returned sequences (`num_beams`, `num_return_sequences`) run that prompt's memory."""
        from transformers import GenerationConfig

        given = kwargs.get("generation_config") or next((a for a in args[1:2] if isinstance(a, GenerationConfig)), None)
        config = given or self.model.generation_config
        beams = kwargs.get("num_beams", config.num_beams) or 1
        returned = kwargs.get("num_return_sequences", config.num_return_sequences) or 1
        copies = max(beams, returned)  # generate repeats each prompt this many times, in place
        if self.memory is None or copies == 1 or (self.rows is None and self.memory.batch_size == 1):
            return self.model.generate(*args, **kwargs)
        prompts = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        if self.rows is None and isinstance(prompts, torch.Tensor) and prompts.shape[0] != self.memory.batch_size:
            raise ValueError(
                f"a memory with batch {self.memory.batch_size} serves {self.memory.batch_size} prompts, one each; "
                f"got {prompts.shape[0]} (pick memories with serving(rows), or use a memory of batch 1)"
            )
        rows = torch.arange(self.memory.batch_size) if self.rows is None else self.rows.cpu()
        with self.serving(rows.repeat_interleave(copies).tolist()):
            return self.model.generate(*args, **kwargs)

    def compute_nll(
        self,
        input_ids: torch.Tensor,
        memory: Memory | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-token NLL, shape (batch, seq - 1), with `memory` (default: the attached one).

        Entry t is -log p(input_ids[:, t + 1] | input_ids[:, : t + 1]); padded targets hold 0.
        """
        check_token_ids(self.model, input_ids, attention_mask)
        input_ids = input_ids.to(self.device)
        attention_mask = None if attention_mask is None else attention_mask.to(self.device)
        memory = self.memory if memory is None else memory
        with torch.no_grad(), self.using(memory):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return token_nll(logits, input_ids, attention_mask)

    # --- memories ----------------------------------------------------------------------------

    def new_metadata(self, init: str, tokens_memorized: int) -> dict:
        rule = {"tau_rule": self.tau_rule} | ({"output_ratio": self.output_ratio} if self.tau_rule == "output" else {})
        return {
            "base_model": getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__,
            "fingerprint": base_fingerprint(self.model),
            "family": self.family.name,
            "num_layers": self.num_layers,
            "hidden_size": self.model.config.hidden_size,
            "mlp_width": mlp_width(self.model),
            "init": init,
            "tokens_memorized": tokens_memorized,
            **rule,
            "output_scales": [round(v, 6) for v in output_scales(self.model).tolist()],
            "weight_signature": weight_signature(self.model).tolist(),
        }

    def default_tau(self, width: int) -> torch.Tensor:
        """tau per (layer, slot) under this model's `tau_rule`, shape (layers, width); the `output` rule measures
        it on a text instead (`memorize`)."""
        if self.tau_rule == "output":
            raise ValueError(
                "tau_rule 'output' measures each layer's MLP output on a text: make the memory with "
                "LocasModel(model, tau_rule='output').memorize(input_ids, keep_top=..., memory_init=...) "
                "(memory_init='random' for random keys), or use tau_rule 'paper' or 'neuron'"
            )
        scales = output_scales(self.model) / (width if self.tau_rule == "paper" else 1)
        return scales.unsqueeze(1).expand(-1, width).clone()

    def attach_memory(self, memory: Memory) -> Memory:
        """Check `memory` against the backbone, move it to the backbone's device and make it active."""
        self._check_attached()
        check_memory(memory, self.model)
        self.memory = memory.to(self.device)
        return self.memory

    def _check_attached(self) -> None:
        if self._detached:
            raise ValueError("this LocasModel was detached from its model; wrap the model again: LocasModel(model)")

    def _check_usable(self, memory: Memory) -> None:
        """A memory passed for one use (`using`, `compute_nll`): made for this backbone; moved to its device."""
        self._check_attached()
        check_memory_shape(memory, self.model)
        memory.to(self.device)  # in place (a Module): the caller's memory object is the one that runs

    def memorize(self, input_ids: torch.Tensor, **kwargs) -> Memory:
        """Initialise and attach a memory from one forward pass; see `locas.initialization.memorize`."""
        from locas.initialization import memorize

        return self.attach_memory(memorize(self, input_ids, **kwargs))

    def to_dense(self, memory: Memory | None = None, index: int | None = None) -> PreTrainedModel:
        """A vanilla model with the memory concatenated into its MLPs; see `locas.merge.to_dense`."""
        from locas.merge import to_dense

        return to_dense(self, self.memory if memory is None else memory, index=index)


def _rebuilt_locas_model(backbone: PreTrainedModel, memory: Memory | None, options: dict, state: tuple) -> LocasModel:
    """A copied or unpickled LocasModel: its backbone's hooks came back inert, so it is wrapped again."""
    rows, wrapper_training, training, backbone_was_training, detached = state
    locas_model = LocasModel(backbone, memory=memory, **options)
    locas_model.training = wrapper_training
    locas_model.rows = rows
    locas_model._backbone_was_training = backbone_was_training
    if detached:
        locas_model.detach()
    backbone.train(training)
    return locas_model


def attach(
    model: PreTrainedModel,
    width: int = 64,
    memory: Memory | None = None,
    seed: int = 0,
    tau_rule: str = "paper",
    output_ratio: float = 0.1,
) -> LocasModel:
    """Freeze `model` and add a memory to every decoder layer.

    Without `memory`, a fresh one of `width` slots is attached: random unit-norm keys and zero values,
    so the model's outputs are exactly the backbone's until the memory is trained or memorized. (The `output`
    tau rule measures a text, so it needs `LocasModel(model, tau_rule="output").memorize(...)` instead.)
    """
    locas_model = LocasModel(model, tau_rule=tau_rule, output_ratio=output_ratio)
    try:
        if memory is None:
            from locas.initialization import random_memory

            memory = random_memory(locas_model, width=width, seed=seed)
        locas_model.attach_memory(memory)
    except BaseException:
        locas_model.detach()  # leave no hooks behind on a model the caller keeps
        raise
    return locas_model


def load_memory(path: str | Path, model: PreTrainedModel | LocasModel) -> Memory:
    """Read a memory file and check it belongs to `model`'s base; attach it when `model` is a LocasModel."""
    memory = Memory.load(path)
    if isinstance(model, LocasModel):
        return model.attach_memory(memory)
    check_memory(memory, model)
    return memory
