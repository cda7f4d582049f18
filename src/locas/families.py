"""One small adapter per MLP family: where the MLP is, its weights, its activation, its width field.

Every adapter reads weights in one canonical orientation, whatever the module stores:

    up   (m, d)   the key rows of the 2-layer MLP's input projection, or the GLU's up projection
    gate (m, d)   the GLU's gate projection (None for 2-layer MLPs)
    down (d, m)   the output projection: column j is neuron j's output vector

and writes a widened MLP back from tensors in that orientation. Adding a family means adding one
adapter here (and a tiny-config case in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class MLPWeights:
    """An MLP's weights in canonical orientation, plus the biases that merging must keep."""

    up: torch.Tensor
    gate: torch.Tensor | None
    down: torch.Tensor
    up_bias: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


class MLPFamily:
    """How to find and rewrite the MLP of one kind of decoder."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    gated: bool = True
    width_field: str = "intermediate_size"
    # Module names TempLoRA-style baselines put LoRA on: attention q, k, v, o and the MLP's projections.
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora_fan_in_fan_out: bool = False

    def layers(self, model: PreTrainedModel) -> list[nn.Module]:
        """The decoder layers, in order."""
        return list(model.get_decoder().layers)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def mlps(self, model: PreTrainedModel) -> list[nn.Module]:
        return [self.mlp(layer) for layer in self.layers(model)]

    def activation(self, mlp: nn.Module) -> nn.Module:
        raise NotImplementedError

    def down_module(self, mlp: nn.Module) -> nn.Module:
        """The module whose input is the intermediate activation (what memorize() scores)."""
        raise NotImplementedError

    def read(self, mlp: nn.Module) -> MLPWeights:
        raise NotImplementedError

    def write(self, mlp: nn.Module, weights: MLPWeights) -> None:
        """Replace the MLP's projections by ones holding `weights` (which may be wider)."""
        raise NotImplementedError


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class GatedFamily(MLPFamily):
    """gate_proj / up_proj / down_proj with `act_fn` (Llama, Qwen2/3, Mistral, Gemma, SmolLM ...)."""

    def activation(self, mlp: nn.Module) -> nn.Module:
        return mlp.act_fn

    def down_module(self, mlp: nn.Module) -> nn.Module:
        return mlp.down_proj

    def read(self, mlp: nn.Module) -> MLPWeights:
        return MLPWeights(
            up=mlp.up_proj.weight,
            gate=mlp.gate_proj.weight,
            down=mlp.down_proj.weight,
            up_bias=mlp.up_proj.bias,
            gate_bias=mlp.gate_proj.bias,
            down_bias=mlp.down_proj.bias,
        )

    def write(self, mlp: nn.Module, weights: MLPWeights) -> None:
        mlp.up_proj = _linear(weights.up, weights.up_bias)
        mlp.gate_proj = _linear(weights.gate, weights.gate_bias)
        mlp.down_proj = _linear(weights.down, weights.down_bias)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = weights.up.shape[0]


class GPT2Family(MLPFamily):
    """GPT-2: Conv1D c_fc (d -> m) and c_proj (m -> d), weights stored as (in, out)."""

    name = "gpt2"
    model_types = ("gpt2",)
    gated = False
    width_field = "n_inner"
    lora_targets = ("c_attn", "c_proj", "c_fc")  # c_proj names both the attention and the MLP output
    lora_fan_in_fan_out = True  # Conv1D stores (in, out)

    def layers(self, model: PreTrainedModel) -> list[nn.Module]:
        return list(model.transformer.h)

    def activation(self, mlp: nn.Module) -> nn.Module:
        return mlp.act

    def down_module(self, mlp: nn.Module) -> nn.Module:
        return mlp.c_proj

    def read(self, mlp: nn.Module) -> MLPWeights:
        return MLPWeights(
            up=mlp.c_fc.weight.T,
            gate=None,
            down=mlp.c_proj.weight.T,
            up_bias=mlp.c_fc.bias,
            down_bias=mlp.c_proj.bias,
        )

    def write(self, mlp: nn.Module, weights: MLPWeights) -> None:
        width, hidden = weights.up.shape
        c_fc = Conv1D(width, hidden).to(device=weights.up.device, dtype=weights.up.dtype)
        c_proj = Conv1D(hidden, width).to(device=weights.up.device, dtype=weights.up.dtype)
        with torch.no_grad():
            c_fc.weight.copy_(weights.up.T)
            c_fc.bias.copy_(weights.up_bias)
            c_proj.weight.copy_(weights.down.T)
            c_proj.bias.copy_(weights.down_bias)
        mlp.c_fc, mlp.c_proj = c_fc, c_proj


class GPTNeoXFamily(MLPFamily):
    """GPT-NeoX / Pythia: Linear dense_h_to_4h (d -> m) and dense_4h_to_h (m -> d), with biases."""

    name = "gpt_neox"
    model_types = ("gpt_neox",)
    gated = False
    lora_targets = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")

    def activation(self, mlp: nn.Module) -> nn.Module:
        return mlp.act

    def down_module(self, mlp: nn.Module) -> nn.Module:
        return mlp.dense_4h_to_h

    def read(self, mlp: nn.Module) -> MLPWeights:
        return MLPWeights(
            up=mlp.dense_h_to_4h.weight,
            gate=None,
            down=mlp.dense_4h_to_h.weight,
            up_bias=mlp.dense_h_to_4h.bias,
            down_bias=mlp.dense_4h_to_h.bias,
        )

    def write(self, mlp: nn.Module, weights: MLPWeights) -> None:
        mlp.dense_h_to_4h = _linear(weights.up, weights.up_bias)
        mlp.dense_4h_to_h = _linear(weights.down, weights.down_bias)


def _gated(name: str, *model_types: str) -> GatedFamily:
    family = GatedFamily()
    family.name, family.model_types = name, model_types
    return family


FAMILIES: tuple[MLPFamily, ...] = (
    _gated("llama", "llama"),
    _gated("qwen2", "qwen2"),
    _gated("qwen3", "qwen3"),
    _gated("mistral", "mistral"),
    _gated("gemma", "gemma", "gemma2", "gemma3_text"),
    GPT2Family(),
    GPTNeoXFamily(),
)


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.model_types)


def family_of(model: PreTrainedModel) -> MLPFamily:
    """The adapter for `model`'s architecture, or a ValueError naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ValueError(
        f"locas does not support model_type {model_type!r} ({type(model).__name__}); "
        f"supported: {', '.join(supported_model_types())}. "
        "To add one, write a small adapter in locas/families.py."
    )
