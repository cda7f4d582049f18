"""Online, score-first test-time training over a long token stream (every evaluation uses this loop).

The stream is cut into chunks. For chunk k the model sees the chunk plus up to `context_window` previous
tokens, labels on the chunk only. The chunk is *scored first*, with the learner as it was before chunk k
(the first training step's forward pass gives that score, so no second forward is run), then trained on
for `steps_per_chunk` optimiser steps (each followed by the learner's clipping), and never re-scored.

Methods: `locas` (a memory, memorized from chunk `memorize_at` before training on it, optionally grown),
`lora` (TempLoRA: a peft LoRA adapter trained the same way), `none` (the backbone with the same window)
and `long` (the backbone with a `long_factor`x longer window).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from locas.memorize import MEMORY_INITS, memorize
from locas.memory import Memory
from locas.model import LocasModel
from locas.training.losses import LOSSES, NEEDS_TEACHER, LossInputs

METHODS = ("locas", "lora", "none", "long")
_SHARED = {"method", "chunk_size", "context_window", "seed"}
_TRAINING = {"lr", "steps_per_chunk", "weight_decay", "loss", "teacher_window", "mix_alpha"}
METHOD_OPTIONS = {
    "none": _SHARED,
    "long": _SHARED | {"long_factor"},
    "locas": _SHARED | _TRAINING | {"width", "memory_init", "memorize_at", "grow_by", "max_width"},
    "lora": _SHARED | _TRAINING | {"lora_rank", "lora_alpha"},
}
METHOD_DEFAULTS = {"locas": {"lr": 4e-3, "steps_per_chunk": 1}, "lora": {"lr": 5e-5, "steps_per_chunk": 2}}


@dataclass
class OnlineConfig:
    """Every knob of an online run. `None` means the method's default (see `resolved`)."""

    method: str = "locas"
    chunk_size: int = 1024
    context_window: int = 2048
    long_factor: int = 4
    width: int = 64
    memory_init: str = "highest"
    memorize_at: int = 0
    grow_by: int = 0
    max_width: int | None = None
    lr: float | None = None
    steps_per_chunk: int | None = None
    weight_decay: float = 0.0
    loss: str = "ntp"
    teacher_window: int | None = None
    mix_alpha: float = 0.5
    lora_rank: int = 64
    lora_alpha: float = 64.0
    seed: int = 0

    def resolved(self) -> OnlineConfig:
        """A copy with the method's defaults filled in; ValueError naming the option for bad values."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.memory_init not in MEMORY_INITS:
            raise ValueError(f"unknown memory_init {self.memory_init!r}; choose one of {', '.join(MEMORY_INITS)}")
        for name in ("width", "long_factor", "lora_rank"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.chunk_size < 2:
            raise ValueError(f"chunk_size must be at least 2 tokens, got {self.chunk_size}")
        if self.context_window < 0:
            raise ValueError(f"context_window must be >= 0, got {self.context_window}")
        if self.chunk_size > self.context_window:
            raise ValueError(
                f"chunk_size {self.chunk_size} is larger than context_window {self.context_window}: "
                "the window of previous tokens must hold at least one chunk"
            )
        defaults = METHOD_DEFAULTS.get(self.method, {"lr": 0.0, "steps_per_chunk": 0})
        lr = defaults["lr"] if self.lr is None else self.lr
        steps = defaults["steps_per_chunk"] if self.steps_per_chunk is None else self.steps_per_chunk
        if self.method in METHOD_DEFAULTS and not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive number, got {lr}")
        if steps < 0:
            raise ValueError(f"steps_per_chunk must be >= 0, got {steps}")
        if self.grow_by < 0 or (self.max_width is not None and self.max_width < self.width):
            raise ValueError(f"grow_by must be >= 0 and max_width >= width; got {self.grow_by}, {self.max_width}")
        teacher_window = 4 * self.context_window if self.teacher_window is None else self.teacher_window
        resolved = dataclasses.replace(self, lr=lr, steps_per_chunk=steps, teacher_window=teacher_window)
        # Options a method does not use go back to their defaults, so that they never tell two runs apart.
        defaults = OnlineConfig(method=self.method, lr=0.0, steps_per_chunk=0)
        used = METHOD_OPTIONS[self.method]
        return dataclasses.replace(
            resolved, **{f.name: getattr(defaults, f.name) for f in dataclasses.fields(self) if f.name not in used}
        )

    @property
    def window(self) -> int:
        """Previous tokens the scored model sees."""
        return self.context_window * (self.long_factor if self.method == "long" else 1)


@dataclass
class ChunkRecord:
    index: int
    start: int  # first token of the chunk in the stream
    end: int
    targets: int  # tokens scored (the stream's first token has no prediction)
    nll_sum: float  # nats, scored before any update on this chunk
    seconds: float
    loss: float | None = None  # the training loss of the chunk's first step (None: not trained)


@dataclass
class OnlineResult:
    config: OnlineConfig
    records: list[ChunkRecord] = field(default_factory=list)
    trainable_parameters: int = 0
    memory: Memory | None = None
    final_state: dict = field(default_factory=dict)  # the learner's state_dict() at the end (see `trained`)

    @property
    def tokens(self) -> int:
        return sum(r.targets for r in self.records)

    @property
    def nll(self) -> float:
        return sum(r.nll_sum for r in self.records) / max(self.tokens, 1)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)


def chunk_spans(num_tokens: int, chunk_size: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk; the last may be shorter."""
    return [(start, min(start + chunk_size, num_tokens)) for start in range(0, num_tokens, chunk_size)]


# --- learners: what is trained, and how -------------------------------------------------------------


class Learner:
    """The backbone as scored and trained by one method. The base class trains nothing."""

    def __init__(self, model: PreTrainedModel, config: OnlineConfig) -> None:
        self.model, self.config = model, config

    def prepare(self, chunk_index: int, chunk_ids: torch.Tensor) -> bool:
        """Called before chunk `chunk_index` is scored; True when the trainable parameters changed."""
        return False

    def parameters(self) -> list[torch.nn.Parameter]:
        return []

    def logits(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False, logits_to_keep=keep).logits

    def generate(self, **kwargs) -> torch.Tensor:
        """`generate` with the memory or adapter active."""
        return self.model.generate(**kwargs)

    def teacher_mode(self):
        """The frozen base model (no memory, no adapter) for the duration of the block."""
        return nullcontext()

    def after_step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        """Give the backbone back as it was."""


class MemoryLearner(Learner):
    def __init__(self, model: PreTrainedModel, config: OnlineConfig) -> None:
        super().__init__(model, config)
        self.locas_model = LocasModel(model)

    @property
    def memory(self) -> Memory | None:
        return self.locas_model.memory

    def prepare(self, chunk_index: int, chunk_ids: torch.Tensor) -> bool:
        config = self.config
        memorize_now = chunk_index == config.memorize_at and self.memory is None
        grow_now = (
            chunk_index > config.memorize_at
            and config.grow_by > 0
            and self.memory is not None
            and self.memory.width + config.grow_by <= (config.max_width or math.inf)
        )
        if not (memorize_now or grow_now):
            return False
        new = memorize(
            self.locas_model,
            chunk_ids.unsqueeze(0).to(self.locas_model.device),
            keep_top=config.width if memorize_now else config.grow_by,
            memory_init=config.memory_init,
            seed=config.seed + chunk_index,
        )
        self.locas_model.attach_memory(new if memorize_now else self.memory.concat(new))
        return True

    def parameters(self) -> list[torch.nn.Parameter]:
        return [] if self.memory is None else list(self.memory.parameters())

    def teacher_mode(self):
        return self.locas_model.using(None)

    def after_step(self) -> None:
        self.memory.clip_()

    def state_dict(self) -> dict:
        if self.memory is None:
            return {"memory": None}
        tensors = {name: t.detach().cpu().clone() for name, t in self.memory.slot_tensors().items()}
        return {"memory": {**tensors, "tau": self.memory.tau.cpu().clone(), "metadata": dict(self.memory.metadata)}}

    def load_state_dict(self, state: dict) -> None:
        saved = state["memory"]
        if saved is not None:
            self.locas_model.attach_memory(Memory(**saved))

    def close(self) -> None:
        self.locas_model.detach()


class LoraLearner(Learner):
    """TempLoRA: a LoRA adapter (peft) on attention q, k, v, o and the MLP projections."""

    def __init__(self, model: PreTrainedModel, config: OnlineConfig) -> None:
        from peft import LoraConfig, get_peft_model

        from locas.families import family_of

        super().__init__(model, config)
        family = family_of(model)
        lora_config = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(family.lora_targets),
            fan_in_fan_out=family.lora_fan_in_fan_out,
        )
        with torch.random.fork_rng(devices=[]):  # the adapter's A matrices are random: seed them, not the caller
            torch.manual_seed(config.seed)
            self.peft_model = get_peft_model(model, lora_config)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.peft_model.parameters() if p.requires_grad]

    def logits(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        return self.peft_model(input_ids=input_ids, use_cache=False, logits_to_keep=keep).logits

    def generate(self, **kwargs) -> torch.Tensor:
        return self.peft_model.generate(**kwargs)

    def teacher_mode(self):
        return self.peft_model.disable_adapter()

    def state_dict(self) -> dict:
        from peft import get_peft_model_state_dict

        return {"adapter": {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.peft_model).items()}}

    def load_state_dict(self, state: dict) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.peft_model, state["adapter"])

    def close(self) -> None:
        self.peft_model.unload()


def make_learner(model: PreTrainedModel, config: OnlineConfig) -> Learner:
    return {"locas": MemoryLearner, "lora": LoraLearner}.get(config.method, Learner)(model, config)


# --- the loop --------------------------------------------------------------------------------------


def _optimizer(parameters: list[torch.nn.Parameter], config: OnlineConfig, previous=None):
    """AdamW over `parameters`; carries `previous`'s moments over when slots were appended (growth)."""
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    if previous is None:
        return optimizer
    for old, new in zip(previous.param_groups[0]["params"], parameters, strict=True):
        state = previous.state.get(old)
        if not state:
            continue
        grown = {}
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() == new.dim() and value.shape != new.shape:
                padding = torch.zeros_like(new)
                padding[tuple(slice(0, n) for n in value.shape)] = value
                value = padding
            grown[key] = value
        optimizer.state[new] = grown
    return optimizer


@contextmanager
def _learner(model: PreTrainedModel, config: OnlineConfig) -> Iterator[Learner]:
    learner = make_learner(model, config)
    try:
        yield learner
    finally:
        learner.close()


@contextmanager
def trained(model: PreTrainedModel, result: OnlineResult) -> Iterator[Learner]:
    """The backbone with a finished run's memory or adapter on, for the block (e.g. to answer questions)."""
    with _learner(model, result.config) as learner:
        learner.load_state_dict(result.final_state)
        yield learner


def _save_atomically(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def train_chunk(
    learner: Learner, optimizer, token_ids: torch.Tensor, start: int, end: int, config: OnlineConfig
) -> tuple[int, float, float | None]:
    """Score tokens [start, end) of the stream, then train on them.

    Returns (tokens scored, their NLL sum, the first step's training loss or None when not trained).
    """
    device = learner.model.device
    targets = token_ids[max(start, 1) : end].unsqueeze(0).to(device)
    count = targets.shape[1]
    input_ids = token_ids[max(0, start - config.window) : end].unsqueeze(0).to(device)
    teacher_cache: list[torch.Tensor] = []

    def teacher() -> torch.Tensor:
        if not teacher_cache:
            teacher_ids = token_ids[max(0, start - config.teacher_window) : end].unsqueeze(0).to(device)
            with torch.no_grad(), learner.teacher_mode():
                teacher_cache.append(learner.logits(teacher_ids, count + 1)[:, :-1])
        return teacher_cache[0]

    def nll_sum(logits: torch.Tensor) -> float:
        return F.cross_entropy(logits.detach().float().flatten(0, 1), targets.flatten(), reduction="sum").item()

    steps = config.steps_per_chunk if optimizer is not None else 0
    if steps == 0:
        with torch.no_grad():
            return count, nll_sum(learner.logits(input_ids, count + 1)[:, :-1]), None
    for step in range(steps):
        logits = learner.logits(input_ids, count + 1)[:, :-1]
        if step == 0:  # the score: this forward ran before any update on this chunk
            score = nll_sum(logits)
        inputs = LossInputs(
            logits, targets, teacher if config.loss in NEEDS_TEACHER else None, {"mix_alpha": config.mix_alpha}
        )
        loss = LOSSES[config.loss](inputs)
        if step == 0:
            first_loss = loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        learner.after_step()
    return count, score, first_loss


def run_online(
    model: PreTrainedModel,
    token_ids: torch.Tensor,
    config: OnlineConfig,
    *,
    state_path: str | Path | None = None,
    save_every: int = 8,
    progress: bool = True,
    description: str = "",
    on_chunk: Callable[[ChunkRecord, Learner], None] | None = None,
) -> OnlineResult:
    """Score-first online training of `config.method` over the 1-D `token_ids`.

    With `state_path`, the learner, the optimiser and the scores so far are saved there atomically every
    `save_every` chunks and at the end; a run started again with the same path continues after the last
    saved chunk and ends with the same numbers. The backbone is given back unchanged.
    """
    config = config.resolved()
    token_ids = token_ids.flatten()
    spans = chunk_spans(token_ids.numel(), config.chunk_size)
    if token_ids.numel() < config.chunk_size:
        raise ValueError(f"the text has {token_ids.numel()} tokens, fewer than one chunk ({config.chunk_size})")
    text_fingerprint = hashlib.sha256(token_ids.cpu().numpy().tobytes()).hexdigest()
    result = OnlineResult(config=config)
    state_path = None if state_path is None else Path(state_path)

    with _learner(model, config) as learner:
        optimizer = None
        if state_path is not None and state_path.exists():
            state = torch.load(state_path, weights_only=False)
            if state["config"] != dataclasses.asdict(config):
                raise ValueError(
                    f"the saved run in {state_path} used other settings; delete it or choose another output"
                )
            if state["text"] != text_fingerprint:
                raise ValueError(f"the saved run in {state_path} read another text; delete it or choose another output")
            result.records = [ChunkRecord(**r) for r in state["records"]]
            learner.load_state_dict(state["learner"])
            if state["optimizer"] is not None:
                optimizer = _optimizer(learner.parameters(), config)
                optimizer.load_state_dict(state["optimizer"])

        def save() -> None:
            if state_path is not None:
                _save_atomically(
                    {
                        "config": dataclasses.asdict(config),
                        "text": text_fingerprint,
                        "records": [dataclasses.asdict(r) for r in result.records],
                        "learner": learner.state_dict(),
                        "optimizer": None if optimizer is None else optimizer.state_dict(),
                    },
                    state_path,
                )

        with tqdm(
            total=len(spans), initial=len(result.records), desc=description, unit="chunk", disable=not progress
        ) as bar:
            for index in range(len(result.records), len(spans)):
                started = time.perf_counter()
                start, end = spans[index]
                if learner.prepare(index, token_ids[start:end]) or (optimizer is None and learner.parameters()):
                    optimizer = _optimizer(learner.parameters(), config, previous=optimizer)
                count, nll_sum, loss = train_chunk(learner, optimizer, token_ids, start, end, config)
                record = ChunkRecord(index, start, end, count, nll_sum, time.perf_counter() - started, loss)
                result.records.append(record)
                if on_chunk is not None:
                    on_chunk(record, learner)
                bar.update(1)
                bar.set_postfix(ppl=f"{math.exp(result.nll):.3f}")
                if (index + 1) % save_every == 0 or index + 1 == len(spans):
                    save()
        result.trainable_parameters = sum(p.numel() for p in learner.parameters())
        result.final_state = learner.state_dict()
        if isinstance(learner, MemoryLearner) and learner.memory is not None:
            result.memory = learner.memory
    return result
