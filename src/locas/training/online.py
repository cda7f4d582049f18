"""Online, score-first test-time training over a long token stream (every evaluation uses this loop).

The stream is cut into chunks. For chunk k the model sees the chunk plus up to `context_window` previous
tokens, labels on the chunk only. The chunk is *scored first*, with the learner as it was before chunk k
(the first training step's forward pass gives that score, so no second forward is run), then trained on
for `steps_per_chunk` optimiser steps (each followed by the learner's clipping), and never re-scored.

Losses: the token losses of `losses.LOSSES` (ntp, sd, mix), and GRPO on the recall task (`grpo`): after
the chunk's score (a forward without gradients), one GRPO batch on prompts cut from the chunk
(`grpo.grpo_train_chunk`, rewarded by the token F1 of the sampled continuation, so the run needs the
tokenizer). `ntp+grpo` runs the chunk's NTP steps (the first one scoring it), then the GRPO batch.
GRPO trains a Locas memory, one document at a time.

Methods: `locas` (a memory, memorized from chunk `memorize_at` before training on it, optionally grown),
`lora` (TempLoRA: a peft LoRA adapter trained the same way), `none` (the backbone with the same window)
and `long` (the backbone with a `long_factor`x longer window).

Presets (`config.PRESETS`): each method's hyperparameters (lr, steps per chunk, width, init, tau rule; LoRA rank,
alpha, targets), filled into the options an `OnlineConfig` leaves at None. `paper` is the paper's Locas and
TempLoRA's published defaults; `default` is what a run gets without naming a preset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from locas.attention import keys_and_values_per_query_head
from locas.data import window_prefix
from locas.families import family_of, supported_model_types
from locas.initialization import memorize
from locas.memory import Memory
from locas.model import LocasModel, check_token_ids, positions, warn_if_float16, weight_signature
from locas.training.config import OnlineConfig, same_settings, settings_changes
from locas.training.grpo import grpo_train_chunk
from locas.training.losses import LOSSES, NEEDS_TEACHER, LossInputs


@dataclass
class ChunkRecord:
    index: int
    start: int  # first token of the chunk in the stream
    end: int
    targets: int  # tokens scored (the stream's first token has no prediction)
    nll_sum: float  # nats, scored before any update on this chunk
    seconds: float
    # The training loss of the chunk's first step, before any update on it (None: not trained): the token
    # loss's (ntp, sd, mix; the NTP of ntp+grpo), or for loss grpo the GRPO loss of the first update.
    loss: float | None = None
    grpo_reward: float | None = None  # GRPO: mean recall reward (token F1) of the sampled continuations
    grpo_kl: float | None = None  # GRPO: KL to the memory-less model on the first update


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
    """The backbone as scored and trained by one method, for `batch_size` documents (each with its own
    trainable state; the rows of a forward pass are documents). The base class trains nothing."""

    max_batch_size: int | None = None  # None: any

    def __init__(self, model: PreTrainedModel, config: OnlineConfig, batch_size: int = 1) -> None:
        if self.max_batch_size is not None and batch_size > self.max_batch_size:
            raise ValueError(
                f"method {config.method!r} adapts {self.max_batch_size} document at a time, not {batch_size}; "
                "run the documents one by one"
            )
        self.model, self.config, self.batch_size = model, config, batch_size
        self.prefix: list[int] = []  # tokens put before every window (`data.window_prefix`: bos for Gemma)
        self.scored: torch.nn.Module = model  # what a forward runs: the backbone, or the backbone with an adapter
        self._compiled: torch.nn.Module | None = None

    def prepare(self, chunk_index: int, chunks: list[torch.Tensor], rows: list[int]) -> bool:
        """Called before chunk `chunk_index` of documents `rows` (tokens `chunks`) is scored; True when the
        trainable parameters changed."""
        return False

    def parameters(self) -> list[torch.nn.Parameter]:
        return []

    def trainable_parameters(self) -> int:
        """How many numbers training changes (for every document together)."""
        return sum(p.numel() for p in self.parameters())

    def parameter_groups(self) -> list[dict]:
        """The optimiser's parameter groups (an "lr" in a group overrides the config's)."""
        return [{"params": self.parameters()}]

    def logits(self, input_ids: torch.Tensor, keep: int | torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """Logits of the last `keep` positions, or of the positions in a 1-D tensor `keep` (negative: from the end);
        row i of `input_ids` belongs to document `rows[i]`."""
        with keys_and_values_per_query_head(self.model):
            output = self.forward_module()(input_ids=self.prefixed(input_ids), use_cache=False, logits_to_keep=keep)
        return output.logits

    def forward_module(self) -> torch.nn.Module:
        """`scored`, compiled on first use under `config.compile` (the memory's hooks are compiled with it)."""
        if not self.config.compiled:
            return self.scored
        if self._compiled is None:
            self._compiled = torch.compile(self.scored, mode=self.config.compile)
        return self._compiled

    def prefixed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.prefix:
            return input_ids
        prefix = torch.tensor(self.prefix, dtype=input_ids.dtype, device=input_ids.device)
        return torch.cat([prefix.expand(input_ids.shape[0], -1), input_ids], dim=1)

    def generate(self, **kwargs) -> torch.Tensor:
        """`generate` with the memory or adapter active."""
        return self.model.generate(**kwargs)

    def teacher_mode(self):
        """The frozen base model (no memory, no adapter) for the duration of the block."""
        return nullcontext()

    def after_step(self) -> None:
        pass

    def state_dict(self, row: int | None = None) -> dict:
        """The trainable state (of document `row` alone, as a batch-1 learner's; None: every document)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        """Give the backbone back as it was."""


class MemoryLearner(Learner):
    def __init__(self, model: PreTrainedModel, config: OnlineConfig, batch_size: int = 1) -> None:
        super().__init__(model, config, batch_size)
        layers = len(family_of(model).mlps(model))
        top = max(1, round(config.top_layers * layers))
        self.locas_model = LocasModel(
            model, tau_rule=config.tau_rule, output_ratio=config.output_ratio, memory_layers=range(layers - top, layers)
        )

    @property
    def memory(self) -> Memory | None:
        return self.locas_model.memory

    def prepare(self, chunk_index: int, chunks: list[torch.Tensor], rows: list[int]) -> bool:
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
        # One document at a time: the same slots (and random draws) as when each document runs alone.
        new = {
            row: memorize(
                self.locas_model,
                self.prefixed(chunk.unsqueeze(0)).to(self.locas_model.device),
                keep_top=config.width if memorize_now else config.grow_by,
                memory_init=config.memory_init,
                seed=config.seed + chunk_index,
                prefix_length=len(self.prefix),
            )
            for row, chunk in zip(rows, chunks, strict=True)
        }
        inert = next(iter(new.values())).zeros_like()  # for documents already finished
        new = Memory.stack([new.get(row, inert) for row in range(self.batch_size)])
        self._attach(new if memorize_now else self.memory.concat(new))
        return True

    def _keys(self) -> list[torch.nn.Parameter]:
        return [t for t in (self.memory.up, self.memory.gate) if t is not None]

    def _attach(self, memory: Memory) -> None:
        self.locas_model.attach_memory(memory)
        for key in self._keys():  # frozen keys (key_lr_scale 0) take no gradient
            key.requires_grad_(self.config.key_lr_scale > 0)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [] if self.memory is None else [p for p in self.memory.parameters() if p.requires_grad]

    def trainable_parameters(self) -> int:
        layers = self.locas_model.memory_layers  # the other layers' slots take no gradient
        return sum(p.numel() for p in self.parameters()) * len(layers) // self.locas_model.num_layers

    def parameter_groups(self) -> list[dict]:
        if self.memory is None:
            return super().parameter_groups()
        keys = [{"params": self._keys(), "lr": self.config.lr * self.config.key_lr_scale}]
        return (keys if self.config.key_lr_scale > 0 else []) + [{"params": [self.memory.down]}]

    def logits(self, input_ids: torch.Tensor, keep: int | torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        every_row = rows is None or list(rows) == list(range(self.batch_size))
        with self.locas_model.serving(None if every_row else rows):
            return super().logits(input_ids, keep)

    def teacher_mode(self):
        return self.locas_model.using(None)

    def after_step(self) -> None:
        self.memory.clip_()

    def state_dict(self, row: int | None = None) -> dict:
        if self.memory is None:
            return {"memory": None}
        memory = self.memory if row is None else self.memory.select(row)
        tensors = {name: t.detach().cpu().clone() for name, t in memory.slot_tensors().items()}
        return {"memory": {**tensors, "tau": memory.tau.cpu().clone(), "metadata": dict(memory.metadata)}}

    def load_state_dict(self, state: dict) -> None:
        saved = state["memory"]
        if saved is not None:
            self._attach(Memory(**saved))

    def close(self) -> None:
        self.locas_model.detach()


def lora_target_modules(family, spec: str) -> list[str]:
    """The module names `spec` ("all", or names separated by commas) means for a model of `family`; ValueError
    naming any that the family does not have."""
    targets = list(family.lora_targets) if spec == "all" else [name.strip() for name in spec.split(",")]
    unknown = [name for name in targets if name not in family.lora_targets]
    if unknown:
        raise ValueError(
            f"lora_targets {spec!r}: {', '.join(unknown)} is not a module of {family.name} models; "
            f"choose all or some of {','.join(family.lora_targets)}"
        )
    return targets


class LoraLearner(Learner):
    """TempLoRA: a LoRA adapter (peft) on the modules `config.lora_targets` names; "all" is the family's
    `lora_targets` (attention q, k, v, o and the MLP projections)."""

    max_batch_size = 1  # peft trains one adapter per model

    def __init__(self, model: PreTrainedModel, config: OnlineConfig, batch_size: int = 1) -> None:
        from peft import LoraConfig, get_peft_model

        from locas.families import family_of

        super().__init__(model, config, batch_size)
        family = family_of(model)
        targets = lora_target_modules(family, config.lora_targets)
        lora_config = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(targets),
            fan_in_fan_out=family.lora_fan_in_fan_out,
        )
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # the A matrices are random: seed them
            # peft reads transformers' deprecated `is_gradient_checkpointing`: a FutureWarning in every LoRA run
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            torch.manual_seed(config.seed)
            self.peft_model = get_peft_model(model, lora_config)
        self.scored = self.peft_model

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.peft_model.parameters() if p.requires_grad]

    def generate(self, **kwargs) -> torch.Tensor:
        return self.peft_model.generate(**kwargs)

    def teacher_mode(self):
        return self.peft_model.disable_adapter()

    def state_dict(self, row: int | None = None) -> dict:
        from peft import get_peft_model_state_dict

        return {"adapter": {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.peft_model).items()}}

    def load_state_dict(self, state: dict) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.peft_model, state["adapter"])

    def close(self) -> None:
        self.peft_model.unload()


def make_learner(model: PreTrainedModel, config: OnlineConfig, batch_size: int = 1) -> Learner:
    return {"locas": MemoryLearner, "lora": LoraLearner}.get(config.method, Learner)(model, config, batch_size)


# --- the loop --------------------------------------------------------------------------------------


def _optimizer(groups: list[dict], config: OnlineConfig, previous=None):
    """AdamW over the parameter `groups`; carries `previous`'s moments over when slots were appended (growth)."""
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    if previous is None:
        return optimizer

    def flat(param_groups: list[dict]) -> list[torch.nn.Parameter]:
        return [parameter for group in param_groups for parameter in group["params"]]

    for old, new in zip(flat(previous.param_groups), flat(optimizer.param_groups), strict=True):
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
def _learner(model: PreTrainedModel, config: OnlineConfig, batch_size: int = 1) -> Iterator[Learner]:
    """Every method runs the backbone in eval mode (no dropout); its mode is given back afterwards."""
    was_training = model.training
    model.eval()
    try:
        learner = make_learner(model, config, batch_size)
        try:
            yield learner
        finally:
            learner.close()
    finally:
        model.train(was_training)


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
    learner: Learner,
    optimizer,
    documents: list[torch.Tensor],
    rows: list[int],
    start: int,
    config: OnlineConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> list[dict]:
    """Score the chunk starting at token `start` of each document in `rows`, then train on it.

    The documents' windows are stacked into one batch (a shorter last chunk is padded at the end and its
    padding never scored nor trained on: causal attention keeps it out of the real tokens; compiled, every
    window is padded to its full length). The training
    loss is the sum of the documents' losses, so each document's gradient is the one it has alone.
    A GRPO loss then runs one GRPO batch on the chunk (one document only; `tokenizer` decodes for the reward).
    Returns per row the `ChunkRecord` fields measured: `targets` (tokens scored), `nll_sum`, `loss`, and
    under a GRPO loss `grpo_reward` and `grpo_kl` (None when not trained).
    """
    device = learner.model.device
    ends = [min(start + config.chunk_size, documents[row].numel()) for row in rows]
    first, end = max(start, 1), max(ends)
    counts = [row_end - first for row_end in ends]
    # Compiled, every chunk has one shape (each window padded to its full length, or to the longest document
    # if that is shorter; the targets to a chunk), so that one compilation serves the whole text; eager, a chunk
    # reads no more tokens than it has.
    count = config.chunk_size if config.compiled else end - first
    longest = max(document.numel() for document in documents)

    def stacked(window_start: int, length: int) -> torch.Tensor:
        return torch.stack(
            [
                F.pad(documents[row][window_start:row_end], (0, length - (row_end - window_start)))
                for row, row_end in zip(rows, ends, strict=True)
            ]
        ).to(device)

    def window(previous_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The input ids of the chunk with up to `previous_tokens` before it, and the positions of the logits that
        predict the targets, counted from the input's end (so a prefix put before the input does not move them;
        given as positions, no slice of the logits is taken, nor filled in backward)."""
        window_start = max(0, start - previous_tokens)
        length = min(previous_tokens + config.chunk_size, longest) if config.compiled else end - window_start
        # (a padded target past a short window's end reads the last logit: it is masked)
        positions = (torch.arange(count, device=device) + (first - 1 - window_start - length)).clamp_(max=-1)
        return stacked(window_start, length), positions

    input_ids, positions = window(config.window)
    targets = stacked(first, count)
    mask = torch.arange(count, device=device) < torch.tensor(counts, device=device).unsqueeze(1)
    teacher_cache: list[torch.Tensor] = []

    def teacher() -> torch.Tensor:
        if not teacher_cache:
            with torch.no_grad(), learner.teacher_mode():
                logits = learner.logits(*window(config.teacher_window))
            # A CUDA graph (compile reduce-overhead) overwrites its outputs at its next run, i.e. the next step's.
            teacher_cache.append(logits.clone() if config.compiled else logits)
        return teacher_cache[0]

    def inputs(logits: torch.Tensor) -> LossInputs:
        needs_teacher = config.token_loss in NEEDS_TEACHER
        return LossInputs(logits, targets, teacher if needs_teacher else None, {"mix_alpha": config.mix_alpha}, mask)

    def nll_sums(step_inputs: LossInputs) -> list[float]:  # the score: the summed NLL of each row's targets
        with torch.no_grad():
            return step_inputs.row_sum(step_inputs.token_nll().detach()).tolist()

    steps = config.steps_per_chunk if optimizer is not None else 0
    if steps == 0:  # the score, from a forward before any update (training is GRPO alone, or none)
        with torch.no_grad():
            scores = nll_sums(inputs(learner.logits(input_ids, positions, rows)))
        first_losses = [None] * len(rows)
    for step in range(steps):
        step_inputs = inputs(learner.logits(input_ids, positions, rows))
        losses = LOSSES[config.token_loss](step_inputs)  # (rows,)
        if step == 0:  # the score: this forward ran before any update on this chunk
            scores = nll_sums(step_inputs)
            first_losses = losses.tolist()
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()
        learner.after_step()
    outcomes = [
        {"targets": n, "nll_sum": nll, "loss": loss} for n, nll, loss in zip(counts, scores, first_losses, strict=True)
    ]
    if config.uses_grpo and optimizer is not None:
        (row,) = rows  # run_online_batch runs GRPO on one document at a time
        stats = grpo_train_chunk(
            learner.locas_model,
            optimizer,
            documents[row][start : ends[0]],
            tokenizer,
            config.grpo_settings(),
            learner.after_step,
            chunk_index=start // config.chunk_size,
        )
        outcomes[0].update(grpo_reward=stats["reward"], grpo_kl=stats["kl"])
        if config.token_loss is None:
            outcomes[0]["loss"] = stats["loss"]
    return outcomes


def _check_stream(model: PreTrainedModel, token_ids, name: str) -> torch.Tensor:
    """`token_ids` (1-D, or (1, N)) as a 1-D stream; TypeError / ValueError naming `name` for anything else
    (not a tensor, several rows, not integers, ids outside the vocabulary)."""
    if not isinstance(token_ids, torch.Tensor):
        raise TypeError(
            f"{name} must be a 1-D tensor of token ids, got {type(token_ids).__name__}; wrap them: torch.tensor(ids)"
        )
    if token_ids.dim() == 2 and token_ids.shape[0] > 1 and token_ids.shape[1] == 1:
        raise ValueError(f"{name} has shape {tuple(token_ids.shape)}, a column: pass {name}.flatten()")
    if token_ids.dim() == 2 and token_ids.shape[0] > 1:
        raise ValueError(
            f"{name} has shape {tuple(token_ids.shape)}: one text is one 1-D stream of token ids; for several "
            "texts (each with its own memory) pass a list of 1-D streams to run_online_batch"
        )
    if token_ids.dim() not in (1, 2):
        raise ValueError(f"{name} must be a 1-D stream of token ids, got shape {tuple(token_ids.shape)}")
    stream = token_ids.reshape(-1)
    # one token per row: the ids' type and range (the stream is cut into windows: its length is no limit)
    check_token_ids(model, stream.view(-1, 1), name=name)
    return stream


def _check_windows(model: PreTrainedModel, config: OnlineConfig, longest_document: int, prefix: list[int]) -> None:
    """ValueError naming the options to shrink when a window of the run holds more tokens than the model has
    learned positions (`config.n_positions`, GPT-2)."""
    learned, _ = positions(model)
    if learned is None:
        return
    window = f"context_window {config.context_window}"
    if config.method == "long":
        window += f" x long_factor {config.long_factor}"
    windows = [(config.window, window)]
    if config.token_loss in NEEDS_TEACHER:
        windows.append((config.teacher_window, f"teacher_window {config.teacher_window}"))
    previous, terms = max(windows, key=lambda pair: pair[0])
    terms = f"chunk_size {config.chunk_size} + {terms}"
    if longest_document < previous + config.chunk_size:
        terms = f"({terms}, cut to the longest text's {longest_document} tokens)"
    if prefix:
        terms += f" + {len(prefix)} prefix token (the tokenizer's bos)"
    tokens = min(previous + config.chunk_size, longest_document) + len(prefix)
    if tokens > learned:
        raise ValueError(
            f"this run's longest window is {terms} = {tokens} tokens, but the model has {learned} positions "
            "(config.n_positions); make these options smaller"
        )


def _fingerprint(token_ids: torch.Tensor) -> str:
    return hashlib.sha256(token_ids.cpu().numpy().tobytes()).hexdigest()


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
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> OnlineResult:
    """Score-first online training of `config.method` over the 1-D `token_ids` (or (1, N); several texts:
    `run_online_batch`).

    `tokenizer` (the model's): every window the model reads starts with its `data.window_prefix` (the bos
    token of tokenizers that add one to every text, as Gemma's; none for SmolLM2 or GPT-2), and the GRPO
    losses need it (their reward compares decoded texts). Without it, windows are the text's tokens alone.
    With `state_path`, the learner, the optimiser and the scores so far are saved there atomically every
    `save_every` chunks and at the end; a run started again with the same path continues after the last
    saved chunk and ends with the same numbers. The backbone is given back unchanged.
    """
    token_ids = _check_stream(model, token_ids, "token_ids")
    on_document_chunk = None if on_chunk is None else (lambda row, record, learner: on_chunk(record, learner))
    return run_online_batch(
        model,
        [token_ids],
        config,
        state_path=state_path,
        save_every=save_every,
        progress=progress,
        description=description,
        on_chunk=on_document_chunk,
        tokenizer=tokenizer,
    )[0]


def run_online_batch(
    model: PreTrainedModel,
    documents: list[torch.Tensor],
    config: OnlineConfig,
    *,
    state_path: str | Path | None = None,
    save_every: int = 8,
    progress: bool = True,
    description: str = "",
    on_chunk: Callable[[int, ChunkRecord, Learner], None] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> list[OnlineResult]:
    """`run_online` over several documents at once, each with its own memory (the memory's batch axis):
    chunk k of every document still running is scored and trained in one forward/backward. Each result
    equals the document's own `run_online` (up to float rounding). `lora` and the GRPO losses take one
    document only.

    A record's `seconds` is the batch's time for that chunk divided by the documents in it.
    """
    config = config.resolved()
    if isinstance(documents, torch.Tensor) and documents.dim() < 2:
        raise ValueError("documents must be a list of 1-D token id tensors; for one text use run_online")
    documents = [_check_stream(model, document, f"documents[{index}]") for index, document in enumerate(documents)]
    if not documents:
        raise ValueError("no documents to train on")
    if config.method in ("locas", "lora"):
        warn_if_float16(model)
    if config.uses_grpo:  # (resolved: a locas run)
        needed = config.grpo_prompt_tokens + config.grpo_continuation_tokens
        if min(config.chunk_size, documents[0].numel()) < needed:
            warnings.warn(
                f"chunk_size {config.chunk_size} is smaller than grpo_prompt_tokens {config.grpo_prompt_tokens} + "
                f"grpo_continuation_tokens {config.grpo_continuation_tokens} = {needed} (or the text is): GRPO cuts "
                "its recall prompts and their continuations from one chunk, so it trains on no chunk; make the "
                "prompt and continuation shorter or the chunk longer",
                stacklevel=3,
            )
        if len(documents) > 1:
            raise ValueError(
                f"loss {config.loss!r} trains one document at a time (its samples come from one memory), "
                f"not {len(documents)}; run the documents one by one"
            )
        if tokenizer is None:
            raise ValueError(
                f"loss {config.loss!r} rewards recall by the token F1 of decoded text: pass the model's "
                "tokenizer (tokenizer=...) to run_online / run_online_batch"
            )
    for index, document in enumerate(documents):
        if document.numel() < config.chunk_size:
            name = "the text" if len(documents) == 1 else f"document {index}"
            raise ValueError(f"{name} has {document.numel()} tokens, fewer than one chunk ({config.chunk_size})")
    spans = [chunk_spans(document.numel(), config.chunk_size) for document in documents]
    if config.method == "locas" and min(map(len, spans)) <= config.memorize_at:  # else nothing is ever trained
        chunks = min(map(len, spans))
        name = "the text has" if len(documents) == 1 else f"document {list(map(len, spans)).index(chunks)} has"
        raise ValueError(
            f"memorize_at={config.memorize_at}, but {name} {chunks} chunks of {config.chunk_size} tokens: "
            f"the memory is made at chunk {config.memorize_at} (counted from 0), so every text needs more than "
            f"{config.memorize_at} chunks; lower memorize_at or chunk_size"
        )
    prefix = [] if tokenizer is None else window_prefix(tokenizer)
    _check_windows(model, config, max(document.numel() for document in documents), prefix)
    fingerprints = [_fingerprint(document) for document in documents]
    # A few weights of every layer, saved with the state: a resumed run must have the same model (none/long run
    # on any causal LM, whose weights are not read).
    saving = state_path is not None and model.config.model_type in supported_model_types()
    weights = weight_signature(model) if saving else None
    results = [OnlineResult(config=config) for _ in documents]
    state_path = None if state_path is None else Path(state_path)

    with _learner(model, config, len(documents)) as learner:
        learner.prefix = prefix
        optimizer = None
        if state_path is not None and state_path.exists():
            state = torch.load(state_path, weights_only=False, map_location="cpu")  # AdamW moves its state back
            if state.get("format") != 2:
                raise ValueError(f"{state_path} was saved by an older locas; delete it or choose another output")
            if not same_settings(state["config"], config):
                raise ValueError(
                    f"the saved run in {state_path} used other settings ({settings_changes(state['config'], config)}); "
                    "pass its settings to resume it (e.g. preset='paper' for a run saved before the default changed), "
                    "or delete it or choose another output"
                )
            if state["texts"] != fingerprints:
                raise ValueError(f"the saved run in {state_path} read another text; delete it or choose another output")
            saved_weights = state.get("weights")  # (not in states saved before it was recorded)
            saved_weights = None if saved_weights is None else torch.tensor(saved_weights)
            if (
                saved_weights is not None
                and weights is not None
                and (saved_weights.shape != weights.shape or not torch.allclose(saved_weights, weights, rtol=1e-2))
            ):
                raise ValueError(
                    f"the saved run in {state_path} was made with other model weights (the same path may hold "
                    "another model now); delete it or choose another output"
                )
            if state.get("prefix", []) != learner.prefix:
                raise ValueError(
                    f"the saved run in {state_path} started its windows with {state.get('prefix', [])}, this one "
                    f"with {learner.prefix} (the tokenizer's bos); delete it or choose another output"
                )
            for result, records, final_state in zip(results, state["records"], state["final_states"], strict=True):
                result.records = [ChunkRecord(**r) for r in records]
                result.final_state = final_state
            learner.load_state_dict(state["learner"])
            if state["optimizer"] is not None:
                optimizer = _optimizer(learner.parameter_groups(), config)
                if len(state["optimizer"]["param_groups"]) == len(optimizer.param_groups):
                    optimizer.load_state_dict(state["optimizer"])
                else:  # saved before the keys had a group of their own: one group of every parameter
                    previous = torch.optim.AdamW(learner.parameters(), lr=config.lr)
                    previous.load_state_dict(state["optimizer"])
                    optimizer = _optimizer(learner.parameter_groups(), config, previous=previous)

        def save() -> None:
            if state_path is not None:
                _save_atomically(
                    {
                        "format": 2,
                        "config": dataclasses.asdict(config),
                        "texts": fingerprints,
                        "weights": None if weights is None else weights.tolist(),
                        "prefix": learner.prefix,
                        "records": [[dataclasses.asdict(r) for r in result.records] for result in results],
                        "final_states": [result.final_state for result in results],
                        "learner": learner.state_dict(),
                        "optimizer": None if optimizer is None else optimizer.state_dict(),
                    },
                    state_path,
                )

        num_chunks = max(len(s) for s in spans)
        done = max(len(result.records) for result in results)
        if done and progress:
            where = "finished earlier, read" if done == num_chunks else f"resuming after chunk {done} of {num_chunks}"
            tqdm.write(f"{description or 'run'}: {where} from {state_path}", sys.stderr)
        with tqdm(total=num_chunks, initial=done, desc=description, unit="chunk", disable=not progress) as bar:
            for index in range(done, num_chunks):
                started = time.perf_counter()
                rows = [row for row in range(len(documents)) if index < len(spans[row])]
                start = spans[rows[0]][index][0]
                chunks = [documents[row][slice(*spans[row][index])] for row in rows]
                if learner.prepare(index, chunks, rows) or (optimizer is None and learner.parameters()):
                    optimizer = _optimizer(learner.parameter_groups(), config, previous=optimizer)
                outcomes = train_chunk(learner, optimizer, documents, rows, start, config, tokenizer)
                if model.device.type == "cuda":  # the step's backward and update may still be queued
                    torch.cuda.synchronize(model.device)
                seconds = (time.perf_counter() - started) / len(rows)
                for row, outcome in zip(rows, outcomes, strict=True):
                    record = ChunkRecord(index, start, spans[row][index][1], seconds=seconds, **outcome)
                    results[row].records.append(record)
                    if index + 1 == len(spans[row]):  # this document is finished: keep its learner state
                        results[row].final_state = learner.state_dict(row if len(documents) > 1 else None)
                    if on_chunk is not None:
                        on_chunk(row, record, learner)
                bar.update(1)
                pooled = sum(r.nll_sum for result in results for r in result.records)
                bar.set_postfix(ppl=f"{math.exp(pooled / max(sum(result.tokens for result in results), 1)):.3f}")
                if (index + 1) % save_every == 0 or index + 1 == num_chunks:
                    save()
        trainable = learner.trainable_parameters() // len(documents)
        for result in results:
            result.trainable_parameters = trainable
            if isinstance(learner, MemoryLearner) and learner.memory is not None:
                result.memory = Memory(**result.final_state["memory"])
    return results
