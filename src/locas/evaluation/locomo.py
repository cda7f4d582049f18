"""LoCoMo long-dialogue QA (method.md, section 5): answer questions about a long dated conversation.

Data: `locomo10.json`, 10 conversations of dated sessions and 1,986 questions in the official categories
1 multi-hop, 2 temporal, 3 open-domain, 4 single-hop, 5 adversarial (checked by their counts on load).

The conversation is rendered session by session in date order (`date_split`): each session is a
`DATE: <date>` line and one `Speaker: text` line per turn. Conditions:

- `none`: no dialogue in the prompt (the floor); `full`: the rendered dialogue in the prompt, cut from
  the left to fit `QASettings.prompt_window` (default: the model's `max_position_embeddings`) less the
  instruction, the longest question and the answer tokens, so every question of a conversation shares
  one dialogue prefix (its KV cache is computed once per conversation and condition);
- `locas` / `lora`: the question alone, answered with a memory / TempLoRA adapter trained by `run_online`
  over the rendered dialogue's tokens; `locas+full` / `lora+full`: the same with the dialogue in the prompt.

One memory (adapter) per conversation and method, trained once and used for all its questions. With an
output folder it is kept there, `memories/<sample_id>.safetensors` (a locas memory file) and
`adapters/<sample_id>.pt` (the LoRA adapter's weights), and a later run loads it instead of training
again (refusing one trained with other settings). A dialogue shorter than one chunk is trained as one
chunk of its own length (no padding: padding tokens would be memorised too). The training loss is
`OnlineConfig.loss`; under `grpo` / `ntp+grpo` the memory learns to recall passages of the dialogue
(prompts cut from the dialogue's tokens, never from the benchmark's questions).

Scores: the official token F1 (`locas.evaluation.token_f1`) per category; category 5 both ways, the
Locas paper's -F1 against `adversarial_answer` and the official rule (1 when the answer contains
"no information available" or "not mentioned").
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from locas.evaluation.config import CATEGORIES, CONDITIONS, WITH_CONTEXT
from locas.evaluation.distributed import SINGLE_PROCESS, Ranks
from locas.evaluation.pg19 import save_figure, write_json
from locas.evaluation.token_f1 import multi_answer_f1, token_f1
from locas.memory import Memory
from locas.model import LocasModel, encode_prefix, positions
from locas.training.config import OnlineConfig, same_settings, settings_changes
from locas.training.online import OnlineResult, run_online, trained

OFFICIAL_COUNTS = {1: 282, 2: 321, 3: 96, 4: 841, 5: 446}
OFFICIAL_CONVERSATIONS = 10
REPORT_ORDER = (4, 1, 3, 2, 5)  # the Locas paper's table: single-hop, multi-hop, open-domain, temporal, adversarial
ABSTENTION_PHRASES = ("no information available", "not mentioned")  # the official category-5 rule

INSTRUCTION = (
    "Based on the conversation{between}, answer the question with a short phrase. "
    "Answer with exact words from the conversation whenever possible."
)
TEMPORAL_HINT = " Use DATE of CONVERSATION to answer with an approximate date."  # as the official code
ABSTAIN_HINT = " If the conversation does not say, answer: Not mentioned in the conversation."
DIALOGUE_HEADER = (
    "Below is a conversation between {a} and {b}. It took place over several sessions; "
    "each session starts with its date.\n\n"
)
_DIALOGUE = "\x00DIALOGUE\x00"  # where the dialogue's tokens go in a prompt

_MONTHS = {
    name: number
    for number, name in enumerate(
        "january february march april may june july august september october november december".split(), 1
    )
}
_DATE = re.compile(r"\s*(\d{1,2}):(\d{2})\s*(am|pm)\s+on\s+(\d{1,2})\s+([a-z]+),?\s+(\d{4})\s*", re.IGNORECASE)


# --- data ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    speaker: str
    text: str
    dia_id: str
    caption: str | None = None  # `blip_caption` of a shared image


@dataclass(frozen=True)
class Session:
    number: int
    date_time: str  # as written in the file, e.g. '1:56 pm on 8 May, 2023'
    date: datetime
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class Question:
    index: int  # position in the conversation's `qa` list
    question: str
    category: int
    answer: str | None  # categories 1-4
    adversarial_answer: str | None  # category 5
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class Conversation:
    sample_id: str
    speaker_a: str
    speaker_b: str
    sessions: tuple[Session, ...]  # in date order
    questions: tuple[Question, ...]


def parse_session_date(text: str) -> datetime:
    """'1:56 pm on 8 May, 2023' -> datetime(2023, 5, 8, 13, 56); ValueError for another format."""
    match = _DATE.fullmatch(text)
    if not match or match.group(5).lower() not in _MONTHS:
        raise ValueError(f"unreadable session date {text!r} (expected e.g. '1:56 pm on 8 May, 2023')")
    hour, minute, half, day, month, year = match.groups()
    hour = int(hour) % 12 + (12 if half.lower() == "pm" else 0)
    return datetime(int(year), _MONTHS[month.lower()], int(day), hour, int(minute))


def _require(mapping: dict, key: str, kind: type | tuple[type, ...], where: str):
    if not isinstance(mapping, dict) or key not in mapping:
        raise ValueError(f"{where}: missing key {key!r}")
    if not isinstance(mapping[key], kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{where}: {key!r} should be a {names}, got {mapping[key]!r:.60}")
    return mapping[key]


def _parse_question(raw: dict, index: int, where: str) -> Question:
    where = f"{where}, question {index}"
    category = _require(raw, "category", int, where)
    if category not in CATEGORIES:
        raise ValueError(f"{where}: unknown category {category} (expected one of 1-5)")
    gold_key = "adversarial_answer" if category == 5 else "answer"
    _require(raw, gold_key, (str, int, float), where)
    answers = {key: None if raw.get(key) is None else str(raw[key]) for key in ("answer", "adversarial_answer")}
    return Question(
        index, _require(raw, "question", str, where), category, **answers, evidence=tuple(raw.get("evidence", ()))
    )


def parse_conversation(raw: dict, where: str = "conversation") -> Conversation:
    """One entry of locomo10.json; sessions sorted by their parsed dates. ValueError naming what is wrong."""
    sample_id = str(raw.get("sample_id", where)) if isinstance(raw, dict) else where
    where = f"{where} ({sample_id})"
    dialogue = _require(raw, "conversation", dict, where)
    sessions = []
    for key in dialogue:
        if not re.fullmatch(r"session_\d+", key):
            continue  # sessions with a date but no turns occur in the file: they hold nothing to render
        turns = [
            Turn(
                _require(turn, "speaker", str, f"{where}, {key}, turn {i}"),
                _require(turn, "text", str, f"{where}, {key}, turn {i}"),
                _require(turn, "dia_id", str, f"{where}, {key}, turn {i}"),
                turn.get("blip_caption"),
            )
            for i, turn in enumerate(_require(dialogue, key, list, where))
        ]
        date_time = _require(dialogue, f"{key}_date_time", str, where)
        try:
            date = parse_session_date(date_time)
        except ValueError as error:
            raise ValueError(f"{where}, {key}: {error}") from None
        sessions.append(Session(int(key.split("_")[1]), date_time, date, tuple(turns)))
    if not sessions:
        raise ValueError(f"{where}: no sessions (keys 'session_<n>' with a list of turns)")
    questions = [_parse_question(qa, i, where) for i, qa in enumerate(_require(raw, "qa", list, where))]
    return Conversation(
        sample_id,
        _require(dialogue, "speaker_a", str, where),
        _require(dialogue, "speaker_b", str, where),
        tuple(sorted(sessions, key=lambda s: (s.date, s.number))),
        tuple(questions),
    )


def check_category_counts(conversations: Sequence[Conversation], source: str | Path) -> None:
    """ValueError naming `source`, each wrong category and its expected vs found counts, unless the
    questions' categories have the official counts (other copies of LoCoMo permute the categories)."""
    found = {category: 0 for category in CATEGORIES}
    for conversation in conversations:
        for question in conversation.questions:
            found[question.category] += 1
    wrong = [
        f"category {c} ({CATEGORIES[c]}): expected {OFFICIAL_COUNTS[c]}, found {found[c]}"
        for c in CATEGORIES
        if found[c] != OFFICIAL_COUNTS[c]
    ]
    if wrong:
        raise ValueError(
            f"{source}: question categories do not match the official LoCoMo mapping ({'; '.join(wrong)}); "
            "use the original locomo10.json"
        )


def load_locomo(
    path: str | Path, sample_ids: Sequence[str] | None = None, check_counts: bool | None = None
) -> list[Conversation]:
    """The conversations of a LoCoMo file (all, or those of `sample_ids`, in that order).

    Every conversation's structure is checked. The category counts are checked when `check_counts`,
    by default when the file holds the full benchmark (10 conversations): a partial file cannot match.
    Raises FileNotFoundError for a missing file and ValueError, naming the file, for anything else wrong.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"LoCoMo path {str(path)!r} is a folder; pass the JSON file in it (e.g. locomo10.json)")
    if not path.is_file():
        raise FileNotFoundError(f"LoCoMo file {str(path)!r} does not exist (expected locomo10.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a JSON file ({error})") from None
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: expected a non-empty JSON list of conversations")
    try:
        conversations = [parse_conversation(entry, f"conversation {i}") for i, entry in enumerate(raw)]
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    if check_counts or (check_counts is None and len(conversations) == OFFICIAL_CONVERSATIONS):
        check_category_counts(conversations, path)
    if sample_ids is None:
        return conversations
    by_id = {c.sample_id: c for c in conversations}
    unknown = [s for s in sample_ids if s not in by_id]
    if unknown:
        raise ValueError(f"{path}: no conversation {', '.join(map(repr, unknown))}; it has {', '.join(by_id)}")
    return [by_id[s] for s in sample_ids]


# --- rendering and scoring -------------------------------------------------------------------------


def render_session(session: Session) -> str:
    """`DATE: <date>` then one `Speaker: text` line per turn (a shared image as `[shared <caption>]`)."""
    lines = [f"DATE: {session.date_time}"]
    for turn in session.turns:
        lines.append(f"{turn.speaker}: {turn.text}" + (f" [shared {turn.caption}]" if turn.caption else ""))
    return "\n".join(lines)


def render_dialogue(conversation: Conversation) -> str:
    """The whole conversation, session by session in date order, sessions separated by a blank line."""
    return "\n\n".join(render_session(session) for session in conversation.sessions) + "\n"


def says_not_mentioned(prediction: str) -> bool:
    """The official category-5 rule: the answer says the information is not available."""
    return any(phrase in prediction.lower() for phrase in ABSTENTION_PHRASES)


def score_answer(prediction: str, question: Question) -> tuple[float, float]:
    """(score, official score) of one answer.

    Categories 1-4: both are the official F1 (category 1: comma-separated parts; category 3: the gold cut
    at its first ';'). Category 5: score = -F1 against the adversarial answer (the Locas paper, higher is
    better), official = 1.0 when `says_not_mentioned`, else 0.0.
    """
    if question.category == 5:
        return -token_f1(prediction, question.adversarial_answer), float(says_not_mentioned(prediction))
    gold = question.answer.split(";")[0].strip() if question.category == 3 else question.answer
    f1 = multi_answer_f1(prediction, gold) if question.category == 1 else token_f1(prediction, gold)
    return f1, f1


# --- conditions and training -----------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    name: str
    method: str  # none, locas or lora: what answers
    with_context: bool  # the dialogue in the prompt


def parse_conditions(names: Sequence[str]) -> list[Condition]:
    """Conditions by name (see CONDITIONS); ValueError for an unknown or repeated name."""
    conditions = []
    for name in names:
        if name not in CONDITIONS:
            raise ValueError(f"unknown condition {name!r}; choose from {', '.join(CONDITIONS)}")
        if name in (c.name for c in conditions):
            raise ValueError(f"condition {name!r} is given twice")
        method, _, context = name.partition("+")
        conditions.append(
            Condition(name, "none" if method == "full" else method, method == "full" or context == "full")
        )
    return conditions


def with_context(names: Sequence[str]) -> list[str]:
    """`names`, each followed by its condition with the dialogue in the prompt (`WITH_CONTEXT`), each once:
    ["none", "locas"] -> ["none", "full", "locas", "locas+full"]."""
    return list(dict.fromkeys(n for name in names for n in (name, WITH_CONTEXT.get(name, name))))


def training_configs(conditions: Sequence[Condition], training: OnlineConfig) -> dict[str, OnlineConfig]:
    """The resolved training config of each method the conditions train (as for a dialogue of at least one
    chunk); ValueError for a setting the trainer refuses (e.g. a chunk larger than the context window)."""
    methods = dict.fromkeys(c.method for c in conditions if c.method != "none")
    return {method: dataclasses.replace(training, method=method).resolved() for method in methods}


@dataclass
class Learned:
    """A conversation's trained memory or adapter, and how it was obtained."""

    method: str
    config: OnlineConfig  # resolved, as trained
    memory: Memory | None = None  # locas
    online: OnlineResult | None = None  # lora: the run whose final state holds the adapter
    stats: dict = field(default_factory=dict)  # tokens, online NLL, trainable parameters, seconds, file


def training_config(base: OnlineConfig, method: str, num_tokens: int) -> OnlineConfig:
    """`base` for `method`, resolved; a chunk larger than the dialogue shrinks to the dialogue's length."""
    if num_tokens < 2:
        raise ValueError(f"the dialogue has {num_tokens} token(s): nothing to train on")
    return dataclasses.replace(base, method=method, chunk_size=min(base.chunk_size, num_tokens)).resolved()


def _config_record(config: OnlineConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))  # as it reads back from a file


def _check_saved_config(saved: dict | None, config: OnlineConfig, path: Path) -> None:
    if not same_settings(saved, OnlineConfig(**_config_record(config))):  # both as read back from a file
        changes = settings_changes(saved, config) if isinstance(saved, dict) else "no settings saved"
        raise ValueError(f"{path} was trained with other settings ({changes}); delete it or choose another output")


def learn_dialogue(
    model: PreTrainedModel,
    dialogue_ids: torch.Tensor,
    method: str,
    base: OnlineConfig,
    *,
    store: str | Path | None = None,
    progress: bool = True,
    description: str = "",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Learned:
    """Train a `method` (locas or lora) memory on the dialogue's tokens with `run_online`, or load it from
    `store` when that file exists (ValueError when it was trained with other settings); saved to `store`.
    `tokenizer` is needed by the GRPO losses: their recall prompts are cut from the dialogue alone."""
    config = training_config(base, method, dialogue_ids.numel())
    store = None if store is None else Path(store)
    if store is not None and store.exists():
        learned = _load_learned(store, method, config)
        if progress:
            tqdm.write(f"{description or method}: trained earlier, read from {store}", sys.stderr)
        return learned
    result = run_online(model, dialogue_ids, config, progress=progress, description=description, tokenizer=tokenizer)
    stats = {
        "tokens": result.tokens,
        "online_nll": result.nll,
        "trainable_parameters": result.trainable_parameters,
        "train_seconds": result.seconds,
    }
    if method == "locas":  # the memory is all that answering needs
        result.memory.metadata.update(online_config=_config_record(config), locomo_training=dict(stats))
        learned = Learned(method, config, memory=result.memory, stats=stats)
    else:
        learned = Learned(method, config, online=result, stats=stats)
    if store is not None:
        _save_learned(learned, store)
    learned.stats.update(file=None if store is None else str(store), loaded=False)
    return learned


def learned_path(output_dir: str | Path, sample_id: str, method: str) -> Path:
    """Where a conversation's memory (`memories/ID.safetensors`) or adapter (`adapters/ID.pt`) is kept."""
    if method == "locas":
        return Path(output_dir) / "memories" / f"{sample_id}.safetensors"
    return Path(output_dir) / "adapters" / f"{sample_id}.pt"


def _save_learned(learned: Learned, path: Path) -> None:
    if learned.memory is not None:
        learned.memory.save(path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    try:
        state = {"online_config": _config_record(learned.config), "final_state": learned.online.final_state}
        torch.save({**state, "stats": learned.stats}, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _load_learned(path: Path, method: str, config: OnlineConfig) -> Learned:
    if method == "locas":
        memory = Memory.load(path)
        _check_saved_config(memory.metadata.get("online_config"), config, path)
        stats = dict(memory.metadata.get("locomo_training", {}))
        learned = Learned(method, config, memory=memory, stats=stats)
    else:
        saved = torch.load(path, weights_only=True, map_location="cpu")
        _check_saved_config(saved.get("online_config"), config, path)
        online = OnlineResult(config=config, final_state=saved["final_state"])
        learned = Learned(method, config, online=online, stats=dict(saved.get("stats", {})))
    learned.stats.update(file=str(path), loaded=True)
    return learned


@contextmanager
def answering_model(model: PreTrainedModel, learned: Learned | None) -> Iterator[Callable[..., torch.Tensor]]:
    """`generate` of the model with the learned memory or adapter on (the bare model for None), for the
    block. The memory's hooks and the adapter's layers live inside `model`'s modules, so calling `model`
    itself in the block uses them too."""
    if learned is None:
        yield model.generate
    elif learned.memory is not None:
        locas_model = LocasModel(model, memory=learned.memory)  # a refused memory leaves no hooks behind
        try:
            yield locas_model.generate
        finally:
            locas_model.detach()
    else:
        with trained(model, learned.online) as learner:
            yield learner.generate


# --- prompts and answering -------------------------------------------------------------------------


@dataclass
class QASettings:
    """How questions are asked and answered."""

    prompt_window: int | None = None  # tokens of prompt + answer; None: the model's max_position_embeddings
    max_new_tokens: int = 32
    abstain_hint: bool = False  # tell every question (category-blind) how to say "not mentioned"
    max_questions: int | None = None  # per conversation, the first N (after `categories`)
    categories: tuple[int, ...] | None = None  # only these categories
    reuse_prefix: bool = True  # compute the shared dialogue prefix's KV cache once per conversation
    answer_batch: int = 8  # questions decoded together (padding between the shared prefix and each question)

    def __post_init__(self) -> None:
        if self.answer_batch < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"answer_batch and max_new_tokens must be >= 1, got {self.answer_batch}, {self.max_new_tokens}"
            )

    def questions(self, conversation: Conversation) -> list[Question]:
        chosen = [q for q in conversation.questions if self.categories is None or q.category in self.categories]
        return chosen[: self.max_questions]


def question_prompt(question: Question, conversation: Conversation, with_context: bool, settings: QASettings) -> str:
    """The user text of one question; with context, `_DIALOGUE` marks where the dialogue goes."""
    between = "" if with_context else f" between {conversation.speaker_a} and {conversation.speaker_b}"
    text = question.question + (TEMPORAL_HINT if question.category == 2 else "")
    hint = ABSTAIN_HINT if settings.abstain_hint else ""
    ask = f"{INSTRUCTION.format(between=between)}{hint}\n\nQuestion: {text}\nShort answer:"
    if not with_context:
        return ask
    header = DIALOGUE_HEADER.format(a=conversation.speaker_a, b=conversation.speaker_b)
    return f"{header}{_DIALOGUE}\n{ask}"


def prompt_pieces(tokenizer: PreTrainedTokenizerBase, user_text: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the dialogue marker (all of them before when there is none), with the
    tokenizer's chat template applied when it has one (instruct models), special tokens as it adds them."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    if chat:
        messages = [{"role": "user", "content": user_text}]
        user_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, _, after = user_text.partition(_DIALOGUE)
    before_ids = tokenizer(before, add_special_tokens=not chat).input_ids
    return list(before_ids), list(tokenizer(after, add_special_tokens=False).input_ids) if after else []


def prompt_window(model: PreTrainedModel, settings: QASettings) -> int:
    """Tokens of prompt + answer: `settings.prompt_window`, by default the model's positions. Longer is refused
    for learned positions (GPT-2) and warned of for rotary ones (they run on, extrapolating)."""
    learned, trained = positions(model)
    window = settings.prompt_window or learned or trained
    if not window:
        raise ValueError("the model's config has no max_position_embeddings; set QASettings.prompt_window")
    if learned and window > learned:
        raise ValueError(
            f"prompt_window {window} is longer than the model's {learned} positions; use {learned} or less"
        )
    if trained and window > trained:
        warnings.warn(
            f"prompt_window {window} runs past the {trained} positions the model was trained on "
            "(max_position_embeddings): its answers there come from extrapolation",
            stacklevel=2,
        )
    return window


class FirstLineDone(StoppingCriteria):
    """Stops generating once the answer's first non-empty line is complete: the answer keeps only that line."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_length: int) -> None:
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor(["\n" in text.lstrip() for text in texts], device=input_ids.device)


def answer_questions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    generate: Callable[..., torch.Tensor],
    conversation: Conversation,
    questions: Sequence[Question],
    dialogue_ids: list[int] | None,
    settings: QASettings,
    progress: bool = True,
    description: str = "",
) -> tuple[list[str], int]:
    """Greedy short answers (first line of at most `max_new_tokens` tokens), `answer_batch` questions at once.

    With `dialogue_ids` the prompt holds as many of the dialogue's last tokens as fit the window with the
    longest question; returns (answers, dialogue tokens in the prompt). ValueError when not even the
    instruction and the question fit. In a batch, each prompt is the shared prefix (the dialogue), then
    masked padding, then its question: the answers are those of one question at a time. Models with
    sliding-window attention place their window by cache position, so padding would hide dialogue tokens
    from it: for them a batch holds questions of one length only (no padding).
    """
    with_context = dialogue_ids is not None
    pieces = [prompt_pieces(tokenizer, question_prompt(q, conversation, with_context, settings)) for q in questions]
    window = prompt_window(model, settings)
    room = window - settings.max_new_tokens - max((len(b) + len(a) for b, a in pieces), default=0)
    if room < 0:
        raise ValueError(f"a prompt window of {window} tokens cannot hold the questions and the answer")
    kept = list(dialogue_ids or [])[max(0, len(dialogue_ids or []) - room) :]
    prompts = [before + kept + after for before, after in pieces]
    # The prefix every prompt shares (the instruction header and the dialogue): computed once, cached.
    prefix = pieces[0][0] + kept if with_context and all(b == pieces[0][0] for b, _ in pieces) else []
    device = model.device
    prefix_cache = encode_prefix(model, prefix) if prefix and settings.reuse_prefix else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: dict[int, str] = {}
    with tqdm(total=len(prompts), desc=description, unit="question", disable=not progress) as bar:
        for batch in _answer_batches([len(prompt) for prompt in prompts], settings.answer_batch, _slides(model)):
            suffixes = [prompts[index][len(prefix) :] for index in batch]
            longest = max(len(suffix) for suffix in suffixes)
            input_ids = torch.tensor([prefix + [pad_id] * (longest - len(x)) + x for x in suffixes], device=device)
            attention_mask = torch.tensor(
                [[1] * len(prefix) + [0] * (longest - len(x)) + [1] * len(x) for x in suffixes], device=device
            )
            options = {}
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache.cache)
                cache.batch_repeat_interleave(len(suffixes))
                options[prefix_cache.keyword] = cache
            with torch.no_grad():
                output_ids = generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=settings.max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=pad_id,
                    stopping_criteria=StoppingCriteriaList([FirstLineDone(tokenizer, input_ids.shape[1])]),
                    **options,
                )
            for index, row in zip(batch, output_ids[:, input_ids.shape[1] :], strict=True):
                text = tokenizer.decode(row, skip_special_tokens=True)
                answers[index] = text.strip().split("\n")[0].strip()
            bar.update(len(suffixes))
    return [answers[index] for index in range(len(prompts))], len(kept)


def _slides(model: PreTrainedModel) -> bool:
    """Whether some attention layer of `model` sees only a sliding window of the cache."""
    config = model.config
    return getattr(config, "sliding_window", None) is not None or "sliding_attention" in (
        getattr(config, "layer_types", None) or ()
    )


def _answer_batches(lengths: list[int], size: int, same_length: bool) -> list[list[int]]:
    """Prompt indices in batches of at most `size`, in order; with `same_length`, each batch holds prompts
    of one length (grouped, so no padding is needed)."""
    if not same_length:
        return [list(range(first, min(first + size, len(lengths)))) for first in range(0, len(lengths), size)]
    groups: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        groups.setdefault(length, []).append(index)
    return [group[first : first + size] for group in groups.values() for first in range(0, len(group), size)]


# --- evaluation ------------------------------------------------------------------------------------


def evaluate_conversation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversation: Conversation,
    conditions: Sequence[Condition],
    training: OnlineConfig,
    settings: QASettings,
    *,
    output_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Every condition on one conversation: {"records": one per (condition, question), "info": tokens,
    training statistics and timings}. Each method's memory is trained (or loaded) once."""
    dialogue_ids = tokenizer(render_dialogue(conversation), add_special_tokens=False, return_tensors="pt").input_ids[0]
    questions = settings.questions(conversation)
    info = {"dialogue_tokens": dialogue_ids.numel(), "questions": len(questions), "training": {}, "conditions": {}}
    learned: dict[str, Learned] = {}
    records = []
    for condition in conditions:
        method = condition.method
        if method != "none" and method not in learned:
            store = None if output_dir is None else learned_path(output_dir, conversation.sample_id, method)
            started = time.perf_counter()
            learned[method] = learn_dialogue(
                model,
                dialogue_ids,
                method,
                training,
                store=store,
                progress=progress,
                description=f"{conversation.sample_id} {method}",
                tokenizer=tokenizer,
            )
            info["training"][method] = {
                **learned[method].stats,
                "chunk_size": learned[method].config.chunk_size,
                "seconds": time.perf_counter() - started,  # this run's: training, or loading the file
            }
        started = time.perf_counter()
        with answering_model(model, learned.get(method)) as generate:
            answers, context_tokens = answer_questions(
                model,
                tokenizer,
                generate,
                conversation,
                questions,
                dialogue_ids.tolist() if condition.with_context else None,
                settings,
                progress=progress,
                description=f"{conversation.sample_id} {condition.name}",
            )
        seconds = time.perf_counter() - started
        info["conditions"][condition.name] = {"context_tokens": context_tokens, "answer_seconds": seconds}
        for question, prediction in zip(questions, answers, strict=True):
            score, official = score_answer(prediction, question)
            records.append(
                {
                    "sample_id": conversation.sample_id,
                    "question_index": question.index,
                    "category": question.category,
                    "condition": condition.name,
                    "question": question.question,
                    "gold": question.adversarial_answer if question.category == 5 else question.answer,
                    "prediction": prediction,
                    "score": score,
                    "official": official,
                }
            )
    return {"records": records, "info": info}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarize(records: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Per condition: mean score per category name (category 5 `adversarial` = -F1, the paper's, and
    `adversarial_official`), `overall` (F1 over categories 1-4), `overall_official` (all categories,
    official rules) and `questions`. Categories without questions are left out."""
    summary = {}
    for condition in dict.fromkeys(r["condition"] for r in records):
        mine = [r for r in records if r["condition"] == condition]
        scores: dict[str, float] = {}
        for category in REPORT_ORDER:
            name = CATEGORIES[category]
            of_category = [r for r in mine if r["category"] == category]
            if of_category:
                scores[name] = _mean([r["score"] for r in of_category])
                if category == 5:
                    scores["adversarial_official"] = _mean([r["official"] for r in of_category])
        answerable = [r["score"] for r in mine if r["category"] != 5]
        if answerable:
            scores["overall"] = _mean(answerable)
        scores["overall_official"] = _mean([r["official"] for r in mine])
        scores["questions"] = len(mine)
        summary[condition] = scores
    return summary


def plot_scores(summary: dict[str, dict[str, float]], path: str | Path, title: str = "LoCoMo") -> Path:
    """A bar chart (PNG) of F1 x 100 per category, one bar per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (*(CATEGORIES[c] for c in REPORT_ORDER), "adversarial_official")
    labels = [k for k in keys if any(k in scores for scores in summary.values())]
    figure, axes = plt.subplots(figsize=(max(6.0, 1.6 * len(labels)), 4.0))
    width = 0.8 / max(len(summary), 1)
    for i, (condition, scores) in enumerate(summary.items()):
        positions = [j + (i - (len(summary) - 1) / 2) * width for j in range(len(labels))]
        axes.bar(positions, [100 * scores.get(k, 0.0) for k in labels], width, label=condition)
    names = {"adversarial": "adversarial\n(-F1)", "adversarial_official": "adversarial\n(official)"}
    axes.set_xticks(range(len(labels)), [names.get(k, k) for k in labels])
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_ylabel("F1 x 100")
    axes.set_title(title)
    axes.legend(fontsize="small")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(figure, path)
    return path


def format_table(results: dict) -> str:
    """The tables printed after an evaluation: F1 x 100 per category and overall for each condition, then
    for each conversation and condition, then each conversation's timings."""
    columns = (*(CATEGORIES[c] for c in REPORT_ORDER), "adversarial_official", "overall", "overall_official")
    short = {"adversarial": "adv -F1", "adversarial_official": "adv official", "overall_official": "overall off."}
    header = "".join(f" {short.get(key, key):>12}" for key in columns) + f" {'questions':>9}"

    def row(label: str, scores: dict[str, float]) -> str:
        cells = "".join(f" {100 * scores[key]:>12.1f}" if key in scores else f" {'-':>12}" for key in columns)
        return f"{label:<22}{cells} {scores['questions']:>9}"

    lines = [f"{'condition':<22}{header}", *(row(name, scores) for name, scores in results["scores"].items())]
    lines += ["", f"{'conversation':<22}{header}"]
    for sample_id, summary in results["per_conversation"].items():
        lines += [row(f"{sample_id} {name}", scores) for name, scores in summary.items()]
    lines.append("")
    for sample_id, info in results["conversations"].items():
        trained = ", ".join(
            f"{method} {stats['seconds']:.1f}s" + (" (loaded)" if stats.get("loaded") else "")
            for method, stats in info["training"].items()
        )
        answered = ", ".join(f"{name} {c['answer_seconds']:.1f}s" for name, c in info["conditions"].items())
        questions = f"{info['questions']} question{'s' * (info['questions'] != 1)}"
        lines.append(
            f"{sample_id}: {info['dialogue_tokens']} dialogue tokens, {questions}; "
            f"trained {trained or '-'}; answered {answered}"
        )
    lines.append(
        f"total {results['seconds']:.1f}s. F1 x 100 (official token F1); adv -F1: minus F1 against the adversarial "
        "answer (the Locas paper's, 0 is best); adv official: share answered 'not mentioned'; overall: categories "
        "1-4; overall off.: all five, official rules"
    )
    return "\n".join(lines)


def evaluate_locomo(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Conversation],
    conditions: Sequence[str] = ("none", "full", "locas", "locas+full"),
    training: OnlineConfig | None = None,
    settings: QASettings | None = None,
    *,
    output_dir: str | Path | None = None,
    progress: bool = True,
    run_info: dict | None = None,
    ranks: Ranks = SINGLE_PROCESS,
) -> dict | None:
    """Answer every conversation's questions under every condition and score them.

    `training` holds the memory's (and LoRA's) online-training settings; its `method` is set per
    condition and `lr`/`steps_per_chunk` left None take each method's default. With `output_dir`, writes
    `results.json`, `locomo.png` and the trained memories there (reused by a later run). `run_info`
    (e.g. the model's name) goes into the results' settings. Under several processes, conversation i is
    evaluated by rank i % N (`ranks`); rank 0 gathers, writes and returns the results, the others None.

    Returns {"conditions", "settings", "scores" (see `summarize`), "per_conversation" (scores of each),
    "conversations" (tokens, training statistics and timings of each), "seconds", "predictions"}.
    """
    parsed = parse_conditions(conditions)
    training = OnlineConfig() if training is None else training
    settings = QASettings() if settings is None else settings
    methods = training_configs(parsed, training)
    started = time.perf_counter()
    evaluated = []
    for conversation in ranks.share(conversations):
        result = evaluate_conversation(
            model, tokenizer, conversation, parsed, training, settings, output_dir=output_dir, progress=progress
        )
        evaluated.append((conversation.sample_id, result))
    by_id = dict(ranks.gather(evaluated))
    if not ranks.is_main:
        return None
    records = [record for c in conversations for record in by_id[c.sample_id]["records"]]
    results = {
        "conditions": [c.name for c in parsed],
        "settings": {
            **(run_info or {}),
            "device": str(model.device),
            "world_size": ranks.world_size,
            "qa": dataclasses.asdict(settings),
            "training": {method: dataclasses.asdict(config) for method, config in methods.items()},
        },
        "scores": summarize(records),
        "per_conversation": {c.sample_id: summarize(by_id[c.sample_id]["records"]) for c in conversations},
        "conversations": {c.sample_id: by_id[c.sample_id]["info"] for c in conversations},
        "seconds": time.perf_counter() - started,
        "predictions": records,
    }
    if output_dir is not None:
        write_results(results, output_dir)
    return results


def write_results(results: dict, output_dir: str | Path) -> Path:
    """`results.json` (atomically) and the chart `locomo.png` into `output_dir`; returns the JSON's path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "results.json"
    write_json(results, path)
    if results["scores"]:
        plot_scores(results["scores"], output_dir / "locomo.png")
    return path
