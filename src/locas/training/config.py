"""The online trainer's settings, importable without torch (the `locas` command builds its options from them).

`OnlineConfig` holds every knob of an online run (`locas.training.online`); a method's hyperparameters left at
None come from a preset (`PRESETS`). `GrpoSettings` are GRPO's knobs (`locas.training.grpo`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from dataclasses import dataclass, field

from locas.config import MEMORY_INITS, TAU_RULES

TOKEN_LOSSES = ("ntp", "sd", "mix")  # the keys of `locas.training.losses.LOSSES`


_KINDS = {int: (numbers.Integral, "an integer"), float: (numbers.Real, "a number"), str: (str, "a string")}


def _plain_values(settings) -> dict:
    """The fields of the dataclass `settings` as plain Python values (numpy scalars converted); ValueError naming
    the first one not of its annotated type: an int field takes an integer (not a bool), a float field any real
    number, a str field a string; None only where the annotation allows it."""
    hints = typing.get_type_hints(type(settings))
    values = {}
    for f in dataclasses.fields(settings):
        value = values[f.name] = getattr(settings, f.name)
        allowed = typing.get_args(hints[f.name]) or (hints[f.name],)
        kind = next(t for t in allowed if t is not type(None))
        if (value is None and type(None) in allowed) or kind not in _KINDS:
            continue
        check, what = _KINDS[kind]
        if not isinstance(value, check) or isinstance(value, bool):
            raise ValueError(f"{f.name} must be {what}, got {value!r} ({type(value).__name__})")
        values[f.name] = kind(value)
    return values


def _check_choice(option: str, value: object, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {option} {value!r}; choose one of {', '.join(choices)}")


@dataclass
class GrpoSettings:
    """Knobs of GRPO training; the recall task's prompt and continuation lengths are in tokens."""

    group_size: int = 4  # completions sampled per prompt
    temperature: float = 1.0
    max_new_tokens: int = 16
    clip_epsilon: float = 0.2
    beta: float = 0.04  # weight of the KL to the memory-less model
    updates_per_batch: int = 1  # optimiser steps on each sampled batch
    prompt_tokens: int = 64
    continuation_tokens: int = 16
    prompts_per_chunk: int = 4
    seed: int = 0

    def __post_init__(self) -> None:  # every message starts with the field's name (OnlineConfig prefixes grpo_)
        for name, value in _plain_values(self).items():
            setattr(self, name, value)
        positive = ("max_new_tokens", "updates_per_batch", "prompt_tokens", "continuation_tokens", "prompts_per_chunk")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be at least 2 (advantages compare completions), got {self.group_size}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0 <= self.clip_epsilon < 1:
            raise ValueError(f"clip_epsilon must be in [0, 1), got {self.clip_epsilon}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")


METHODS = ("locas", "lora", "none", "long")
GRPO_LOSSES = ("grpo", "ntp+grpo")  # GRPO alone, or the chunk's NTP steps then GRPO (locas only)
TRAINING_LOSSES = (*TOKEN_LOSSES, *GRPO_LOSSES)
_SHARED = {"method", "preset", "chunk_size", "context_window", "seed", "compile"}
# How the scored model runs: eagerly, or compiled by `torch.compile` in one of its modes (every chunk then has
# one shape, so that one compilation serves a whole text; the numbers are the eager ones up to float rounding).
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
_TRAINING = {"lr", "steps_per_chunk", "weight_decay", "loss", "teacher_window", "mix_alpha"}
_GRPO = {
    "grpo_group_size",
    "grpo_prompts_per_chunk",
    "grpo_prompt_tokens",
    "grpo_continuation_tokens",
    "grpo_temperature",
    "grpo_max_new_tokens",
    "grpo_clip_epsilon",
    "grpo_beta",
    "grpo_updates_per_batch",
}
METHOD_OPTIONS = {  # the grpo_ options count only under the GRPO losses (see `OnlineConfig.resolved`)
    "none": _SHARED,
    "long": _SHARED | {"long_factor"},
    "locas": _SHARED
    | _TRAINING
    | _GRPO
    | {
        "width",
        "memory_init",
        "tau_rule",
        "output_ratio",
        "top_layers",
        "key_lr_scale",
        "memorize_at",
        "grow_by",
        "max_width",
    },
    "lora": _SHARED | _TRAINING | {"lora_rank", "lora_alpha", "lora_targets"},
}

# Each method's values of the options a preset sets (`OnlineConfig` leaves them at None). `paper`: Locas as in the
# paper (method.md) and TempLoRA's published defaults. `default`: what a run gets without naming a preset: for
# TempLoRA its best point of the sweep on the development books (benchmarks/pg19_sweep.py, README "Presets and
# the sweep"), so that Locas is never compared with a strawman. The chunk and the window are not in a preset:
# every method of a comparison reads the same chunks with the same window (OnlineConfig's 1024 and 2048 are the
# paper's).
PAPER = {
    "locas": {
        "lr": 4e-3,
        "steps_per_chunk": 1,
        "width": 64,
        "memory_init": "highest",
        "tau_rule": "paper",
        "output_ratio": 0.1,  # used by tau_rule "output" only (the paper has no such rule)
        "top_layers": 1.0,
        "key_lr_scale": 1.0,
    },
    "lora": {"lr": 5e-5, "steps_per_chunk": 2, "lora_rank": 64, "lora_alpha": 64.0, "lora_targets": "all"},
}
# Locas: the paper's settings with the output scale measured on the memorized text (`tau_rule` output, ratio 0.1),
# the one scale of the sweep that does well on both SmolLM2-135M and Gemma-3-270M, where the paper's scale is 64x
# too weak on the first and the per-neuron scale (SmolLM2's best fixed scale) wrecks the second (README "Presets
# and the sweep"). TempLoRA's best point does worse than none on Gemma; keeping it errs against Locas.
DEFAULT = {
    "locas": {**PAPER["locas"], "tau_rule": "output", "output_ratio": 0.1},
    "lora": {**PAPER["lora"], "lr": 1e-3, "steps_per_chunk": 1},
}
PRESETS = {"paper": PAPER, "default": DEFAULT}
# Where a method does not use a preset option (and in a config saved before the option existed) it holds the
# paper's value, as before presets: unused options never tell two runs apart, and saved configs still match.
_UNUSED = {**PAPER["locas"], **PAPER["lora"], "lr": 0.0, "steps_per_chunk": 0}


@dataclass
class OnlineConfig:
    """Every knob of an online run. `None` means the value of `preset` for the method (see `resolved`).

    `steps_per_chunk` counts the token loss's steps (ntp, sd, mix; the NTP of `ntp+grpo`); loss `grpo` has
    none (0). The `grpo_` options are `GrpoSettings`' fields (see `grpo_settings`), seeded by `seed`.
    """

    method: str = "locas"
    preset: str = field(default="default", compare=False)  # a key of PRESETS; recorded, never tells runs apart
    chunk_size: int = 1024
    context_window: int = 2048
    long_factor: int = 4
    width: int | None = None
    memory_init: str | None = None
    tau_rule: str | None = None  # a key of `locas.config.TAU_RULES`: how a new memory's output scale is set
    output_ratio: float | None = None  # tau_rule "output": the memory's full output / the layer's MLP output
    top_layers: float | None = None  # locas: the fraction of the decoder layers, from the top, that run the memory
    memorize_at: int = 0
    grow_by: int = 0
    max_width: int | None = None
    lr: float | None = None
    key_lr_scale: float | None = None  # locas: the keys (up, gate) learn at lr * this, the values at lr
    steps_per_chunk: int | None = None
    weight_decay: float = 0.0
    loss: str = "ntp"
    teacher_window: int | None = None
    mix_alpha: float = 0.5
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: str | None = None  # "all" (the model family's `lora_targets`) or some of them, comma-separated
    grpo_group_size: int = GrpoSettings.group_size
    grpo_prompts_per_chunk: int = GrpoSettings.prompts_per_chunk
    grpo_prompt_tokens: int = GrpoSettings.prompt_tokens
    grpo_continuation_tokens: int = GrpoSettings.continuation_tokens
    grpo_temperature: float = GrpoSettings.temperature
    grpo_max_new_tokens: int = GrpoSettings.max_new_tokens
    grpo_clip_epsilon: float = GrpoSettings.clip_epsilon
    grpo_beta: float = GrpoSettings.beta
    grpo_updates_per_batch: int = GrpoSettings.updates_per_batch
    seed: int = 0
    compile: str = field(default="off", compare=False)  # a key of COMPILE_MODES; never tells runs apart

    def resolved(self) -> OnlineConfig:
        """A copy with the preset's values in the options left at None, and the options the method does not use
        at fixed values (so that they never tell two runs apart); ValueError naming the option for bad values."""
        _check_choice("method", self.method, METHODS)
        _check_choice("preset", self.preset, PRESETS)
        _check_choice("loss", self.loss, TRAINING_LOSSES)
        if self.uses_grpo and self.method == "lora":
            raise ValueError(f"loss {self.loss!r} trains a Locas memory (method locas), not a LoRA adapter")
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.loss == "grpo" and self.method == "locas":
            if self.steps_per_chunk:
                raise ValueError(
                    f"steps_per_chunk {self.steps_per_chunk}: loss 'grpo' has no token-loss steps; use loss "
                    "'ntp+grpo' for NTP steps before GRPO, or grpo_updates_per_batch for more GRPO updates"
                )
            values["steps_per_chunk"] = 0
        if self.loss == "ntp+grpo" and self.method == "locas" and self.steps_per_chunk == 0:
            raise ValueError("steps_per_chunk 0 with loss 'ntp+grpo' leaves GRPO alone: use loss 'grpo'")
        if values["teacher_window"] is None:
            values["teacher_window"] = 4 * self.context_window
        preset = PRESETS[self.preset].get(self.method, {})
        used = METHOD_OPTIONS[self.method] - (set() if self.uses_grpo else _GRPO)
        unused = OnlineConfig(**_UNUSED)
        for name in values:
            if name not in used:
                values[name] = getattr(unused, name)
            elif values[name] is None:  # the preset's value; the paper's where the preset does not set it
                values[name] = preset.get(name, PAPER.get(self.method, {}).get(name, getattr(unused, name)))
        if values["tau_rule"] != "output":  # only the output rule reads it
            values["output_ratio"] = unused.output_ratio
        config = OnlineConfig(**_plain_values(OnlineConfig(**values)))
        config._check()
        return config

    def _check(self) -> None:
        """ValueError naming the first bad option of a resolved config."""
        _check_choice("memory_init", self.memory_init, MEMORY_INITS)
        _check_choice("tau_rule", self.tau_rule, TAU_RULES)
        _check_choice("compile mode", self.compile, COMPILE_MODES)
        for name in ("width", "long_factor", "lora_rank"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha}")
        if not all(name.strip() for name in self.lora_targets.split(",")):
            raise ValueError(
                f"lora_targets must be 'all' or module names separated by commas, got {self.lora_targets!r}"
            )
        if self.chunk_size < 2:
            raise ValueError(f"chunk_size must be at least 2 tokens, got {self.chunk_size}")
        if self.context_window < 0:
            raise ValueError(f"context_window must be >= 0, got {self.context_window}")
        if self.chunk_size > self.context_window:
            raise ValueError(
                f"chunk_size {self.chunk_size} is larger than context_window {self.context_window}: "
                "the window of previous tokens must hold at least one chunk"
            )
        if self.method in ("locas", "lora") and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 < self.top_layers <= 1:
            raise ValueError(f"top_layers must be a fraction in (0, 1] of the layers, got {self.top_layers}")
        if not (self.output_ratio > 0 and math.isfinite(self.output_ratio)):
            raise ValueError(f"output_ratio must be a positive number, got {self.output_ratio}")
        if not (self.key_lr_scale >= 0 and math.isfinite(self.key_lr_scale)):
            raise ValueError(f"key_lr_scale must be a number >= 0 (0: frozen keys), got {self.key_lr_scale}")
        if self.steps_per_chunk < 0:
            raise ValueError(f"steps_per_chunk must be >= 0, got {self.steps_per_chunk}")
        if self.grow_by < 0:
            raise ValueError(f"grow_by must be >= 0, got {self.grow_by}")
        if self.max_width is not None and self.max_width < self.width:
            raise ValueError(
                f"max_width must be >= width {self.width} (the memory's first width), got {self.max_width}"
            )
        if self.compiled and self.grow_by > 0 and self.method == "locas":
            raise ValueError(
                f"compile {self.compile!r} with grow_by {self.grow_by}: a growing memory changes shape every chunk, "
                "and each shape is a new compilation; use compile 'off' to grow the memory"
            )
        if self.uses_grpo:
            self.grpo_settings()  # ValueError for a bad grpo_ option

    @property
    def window(self) -> int:
        """Previous tokens the scored model sees."""
        return self.context_window * (self.long_factor if self.method == "long" else 1)

    @property
    def compiled(self) -> bool:
        """Whether the scored model runs through `torch.compile` (every chunk then has one shape)."""
        return self.compile != "off"

    @property
    def uses_grpo(self) -> bool:
        return self.loss in GRPO_LOSSES

    @property
    def token_loss(self) -> str | None:
        """The loss of the `steps_per_chunk` steps (a key of `LOSSES`); None for `grpo` alone."""
        return {"grpo": None, "ntp+grpo": "ntp"}.get(self.loss, self.loss)

    def grpo_settings(self) -> GrpoSettings:
        """The `grpo_` options (and `seed`) as `GrpoSettings`; ValueError naming a bad one."""
        values = {
            f.name.removeprefix("grpo_"): getattr(self, f.name) for f in dataclasses.fields(self) if f.name in _GRPO
        }
        try:
            return GrpoSettings(**values, seed=self.seed)
        except ValueError as error:
            raise ValueError(f"grpo_{error}") from None


def saved_config(saved: dict) -> OnlineConfig:
    """The config of `saved` (`dataclasses.asdict` of a resolved config, e.g. read back from a file); options added
    to `OnlineConfig` since it was saved take the values they had before (the paper's, for the preset options)."""
    return OnlineConfig(**{**_UNUSED, **saved})


def same_settings(saved: dict | None, config: OnlineConfig) -> bool:
    """Whether `saved` (`dataclasses.asdict` of a resolved config, e.g. read back from a file) holds `config`'s
    settings (see `saved_config`)."""
    try:
        return saved_config(saved) == config
    except TypeError:  # None, or an option this version does not know
        return False


def settings_changes(saved: dict, config: OnlineConfig) -> str:
    """What differs between `saved` (as in `same_settings`) and `config`, e.g. "tau_rule 'paper' -> 'neuron'"."""
    try:
        before = saved_config(saved)
    except TypeError:
        return "saved by another version of locas"
    changes = [
        f"{f.name} {getattr(before, f.name)!r} -> {getattr(config, f.name)!r}"
        for f in dataclasses.fields(config)
        if f.compare and getattr(before, f.name) != getattr(config, f.name)
    ]
    return ", ".join(changes) or "none"
