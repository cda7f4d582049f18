"""MMLU (Hendrycks et al., ICLR 2021): k-shot multiple choice, answered by the next-token log-probabilities.

Data: a folder with `test/SUBJECT_test.csv` (the questions) and `dev/SUBJECT_dev.csv` (the few-shot examples),
each with the header `question,choice0,choice1,choice2,choice3,answer` and `answer` an integer 0-3 (0 = A).

The prompt is the original paper's (with single spaces in the subject name):

    The following are multiple choice questions (with answers) about abstract algebra.

    <dev question 1>
    A. <choice0>
    B. <choice1>
    C. <choice2>
    D. <choice3>
    Answer: B

    ... the first k dev questions of the subject, each as above ...
    <test question>
    A. <choice0>
    ...
    D. <choice3>
    Answer:

It is tokenized with the tokenizer's special tokens (e.g. a BOS token where the tokenizer adds one). One forward
pass per question (`logits_to_keep=1`) gives the log-probabilities of " A", " B", " C" and " D" at the prompt's
last position; the prediction is the most likely letter. A tokenizer that encodes " A" as two tokens (a space,
then the letter, as byte-level BPEs without the merge do) gets the shared space token appended to the prompt.
The header and shots are the same for every question of a subject: their KV cache is computed once per subject
and each question's forward pass runs over its own tokens only (the same scores up to float rounding; about 3x
faster 5-shot on the embedded model).

A prompt longer than the model's window (`max_position_embeddings`) keeps the first k - j dev examples for the
smallest j that makes it fit; a question too long even with no examples keeps its last tokens. Each question's
record says how many examples it used (`shots`) and whether it was cut (`truncated`).
"""

from __future__ import annotations

import copy
import csv
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from locas.model import PrefixCache, encode_prefix

HEADER = ("question", "choice0", "choice1", "choice2", "choice3", "answer")
LETTERS = "ABCD"
ROW_FIX = "each row needs a question, four choices and an answer 0-3 (0 = A)"


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index into choices


@dataclass
class Subject:
    name: str  # as in the file names, e.g. abstract_algebra
    dev: list[Question]  # few-shot examples, in file order
    test: list[Question]  # the questions scored, in file order


# --- data ------------------------------------------------------------------------------------------


def read_questions(path: str | Path, subject: str) -> list[Question]:
    """The questions of one MMLU CSV file; ValueError naming the file and line of a bad header or row."""
    path = Path(path)
    questions = []
    line = 1
    try:
        with path.open(encoding="utf-8", newline="") as file:
            reader = csv.reader(file)
            header = next(reader, None)
            if header is None or tuple(field.strip() for field in header) != HEADER:
                raise ValueError(
                    f"{path}, line 1: the header is {','.join(header or [])!r}; it must be {','.join(HEADER)!r}"
                )
            line = reader.line_num + 1
            for row in reader:
                row_line, line = line, reader.line_num + 1  # a quoted field may span several lines
                if not row:
                    continue
                questions.append(_parse_row(row, subject, f"{path}, line {row_line}"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason}); save it as UTF-8") from error
    except csv.Error as error:
        raise ValueError(f"{path}, line {line}: not valid CSV ({error}); {ROW_FIX}") from error
    if not questions:
        raise ValueError(f"{path} holds no questions, only a header; {ROW_FIX}")
    return questions


def _parse_row(row: list[str], subject: str, where: str) -> Question:
    if len(row) != len(HEADER):
        raise ValueError(f"{where}: {len(row)} fields, expected {len(HEADER)}; {ROW_FIX}")
    try:
        answer = int(row[5].strip())
    except ValueError:
        raise ValueError(f"{where}: the answer {row[5]!r} is not an integer; {ROW_FIX}") from None
    if answer not in range(len(LETTERS)):
        raise ValueError(f"{where}: the answer {answer} is out of range; {ROW_FIX}")
    return Question(subject, row[0], tuple(row[1:5]), answer)


def list_subjects(directory: str | Path) -> list[str]:
    """The subjects of an MMLU folder (from `test/SUBJECT_test.csv`), sorted."""
    test = Path(directory) / "test"
    if not Path(directory).is_dir():
        what = "is a file, not a folder" if Path(directory).exists() else "does not exist"
        raise FileNotFoundError(f"MMLU folder {str(directory)!r} {what}")
    if not test.is_dir():
        raise FileNotFoundError(
            f"MMLU folder {str(directory)!r} has no test/ folder; it must hold test/SUBJECT_test.csv "
            "and dev/SUBJECT_dev.csv files"
        )
    names = sorted(path.name.removesuffix("_test.csv") for path in test.glob("*_test.csv"))
    if not names:
        raise ValueError(f"{test} holds no SUBJECT_test.csv files")
    return names


def load_mmlu(
    directory: str | Path,
    subjects: Sequence[str] | None = None,
    limit_per_subject: int | None = None,
    shots: int = 5,
) -> list[Subject]:
    """The chosen subjects (default: all, sorted), each with its first `limit_per_subject` test questions and
    its first `shots` dev examples; ValueError for an unknown or repeated subject or too few dev examples."""
    directory = Path(directory)
    available = list_subjects(directory)
    if subjects is None:
        subjects = available
    loaded = []
    for name in subjects:
        if name not in available:
            raise ValueError(
                f"unknown MMLU subject {name!r}: {directory / 'test'} has no {name}_test.csv "
                f"({len(available)} subjects, e.g. {', '.join(available[:3])})"
            )
        if name in (subject.name for subject in loaded):
            raise ValueError(f"MMLU subject {name!r} is given twice")
        test = read_questions(directory / "test" / f"{name}_test.csv", name)[:limit_per_subject]
        dev = []
        if shots > 0:
            dev_path = directory / "dev" / f"{name}_dev.csv"
            if not dev_path.is_file():
                raise FileNotFoundError(f"{dev_path} does not exist: {shots}-shot prompts need the dev examples")
            dev = read_questions(dev_path, name)
            if len(dev) < shots:
                raise ValueError(f"{dev_path} holds {len(dev)} examples, fewer than {shots} shots; ask for fewer")
        loaded.append(Subject(name, dev[:shots], test))
    return loaded


# --- prompts -----------------------------------------------------------------------------------------


def format_question(question: Question, with_answer: bool) -> str:
    """The question, its lettered choices and 'Answer:', plus ' X' and a blank line for an example."""
    choices = [f"{letter}. {choice}" for letter, choice in zip(LETTERS, question.choices, strict=True)]
    text = "\n".join([question.question, *choices, "Answer:"])
    return text + f" {LETTERS[question.answer]}\n\n" if with_answer else text


def prompt_head(subject: str, examples: Sequence[Question]) -> str:
    """The header line and the solved `examples`: what every question of a subject is asked after."""
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}."
    return header + "\n\n" + "".join(format_question(example, True) for example in examples)


def build_prompt(question: Question, examples: Sequence[Question]) -> str:
    """The subject's header line, the solved `examples`, then `question` up to 'Answer:'."""
    return prompt_head(question.subject, examples) + format_question(question, False)


def answer_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(prefix, letters): " A" ... " D" encode as the shared `prefix` (usually empty) plus one letter token each."""
    encoded = [tokenizer(f" {letter}", add_special_tokens=False).input_ids for letter in LETTERS]
    prefix = encoded[0][:-1]
    if not all(encoded) or any(ids[:-1] != prefix for ids in encoded) or len({ids[-1] for ids in encoded}) < 4:
        raise ValueError(
            f"the tokenizer encodes ' A', ' B', ' C', ' D' as {encoded}: MMLU scoring needs a shared prefix plus "
            "one distinct token per letter, read from one position"
        )
    return prefix, [ids[-1] for ids in encoded]


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, question: Question, examples: Sequence[Question], window: int, prefix: list[int]
) -> tuple[list[int], int, bool]:
    """(token ids, examples used, truncated): the prompt with as many of `examples` as fit in `window` tokens."""
    for shots in range(len(examples), -1, -1):
        ids = tokenizer(build_prompt(question, examples[:shots]), verbose=False).input_ids + prefix
        if len(ids) <= window:
            return ids, shots, False
    return ids[-window:], 0, True


# --- scoring -----------------------------------------------------------------------------------------


def model_window(model) -> int:
    """The longest input the model takes: its config's `max_position_embeddings`."""
    config = getattr(model, "config", None) or model.model.config  # a LocasModel keeps the backbone in .model
    return config.max_position_embeddings


@torch.no_grad()
def letter_logprobs(model, input_ids: list[int], letters: list[int], head: PrefixCache | None = None) -> list[float]:
    """Log-probabilities of the `letters` tokens after `input_ids` (the last position only), in one forward
    pass; over only the tokens after `head` when `input_ids` starts with it."""
    options, start = {}, 0
    if head is not None and len(input_ids) > len(head.ids) and input_ids[: len(head.ids)] == head.ids:
        options, start = {head.keyword: copy.deepcopy(head.cache)}, len(head.ids)  # the forward extends the cache
    ids = torch.tensor([input_ids[start:]], device=model.device)
    logits = model(input_ids=ids, use_cache=bool(options), logits_to_keep=1, **options).logits[0, -1].float()
    return logits.log_softmax(-1)[letters].tolist()


def shared_length(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of two token lists."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def summarize(records: Sequence[dict]) -> dict:
    """Accuracy per subject, their mean (`macro_accuracy`) and the accuracy over all questions (`micro_accuracy`)."""
    by_subject: dict[str, list[bool]] = {}
    for record in records:
        by_subject.setdefault(record["subject"], []).append(record["correct"])
    subjects = {
        name: {"questions": len(correct), "correct": sum(correct), "accuracy": sum(correct) / len(correct)}
        for name, correct in by_subject.items()
    }
    return {
        "questions": len(records),
        "correct": sum(subject["correct"] for subject in subjects.values()),
        "macro_accuracy": statistics.fmean(subject["accuracy"] for subject in subjects.values()),
        "micro_accuracy": sum(subject["correct"] for subject in subjects.values()) / len(records),
        "subjects": subjects,
    }


def score_mmlu(
    model,
    tokenizer: PreTrainedTokenizerBase,
    subjects: Sequence[Subject],
    *,
    window: int | None = None,
    reuse_head: bool = True,
    progress: bool = True,
    description: str = "MMLU",
) -> dict:
    """Answer every test question of `subjects` with its subject's dev examples as shots (see the module doc).

    `model` is any callable causal LM with `.device` (a transformers model, a LocasModel, a peft model);
    `window` defaults to its `max_position_embeddings`. With `reuse_head`, the KV cache of each subject's
    header and shots is computed once (the head is what a prompt shares with the header and shots encoded
    alone, so no tokenization across the boundary is assumed; a prompt with fewer shots runs whole).

    Returns `summarize`'s numbers, the shots asked for, how many questions got fewer or were truncated, and
    one record per question (`records`: subject, index in the file, answer, prediction, correct, shots,
    truncated, the four log-probabilities).
    """
    window = window or model_window(model)
    prefix, letters = answer_tokens(tokenizer)
    records = []
    total = sum(len(subject.test) for subject in subjects)
    with tqdm(total=total, desc=description, unit="question", disable=not progress) as bar:
        for subject in subjects:
            head_ids = tokenizer(prompt_head(subject.name, subject.dev), verbose=False).input_ids
            head = None
            for index, question in enumerate(subject.test):
                ids, shots, truncated = prompt_ids(tokenizer, question, subject.dev, window, prefix)
                if reuse_head and head is None and shots == len(subject.dev):
                    shared = min(shared_length(head_ids, ids), len(ids) - 1)
                    head = encode_prefix(model, ids[:shared]) if shared > 0 else None
                logprobs = letter_logprobs(model, ids, letters, head)
                prediction = max(range(len(LETTERS)), key=logprobs.__getitem__)
                records.append(
                    {
                        "subject": subject.name,
                        "index": index,
                        "answer": question.answer,
                        "prediction": prediction,
                        "correct": prediction == question.answer,
                        "shots": shots,
                        "truncated": truncated,
                        "logprobs": [round(value, 5) for value in logprobs],
                    }
                )
                bar.update(1)
    shots_asked = max((len(subject.dev) for subject in subjects), default=0)
    return {
        "shots": shots_asked,
        **summarize(records),
        "fewer_shots": sum(record["shots"] < shots_asked for record in records),
        "truncated": sum(record["truncated"] for record in records),
        "records": records,
    }


def evaluate_mmlu(
    model,
    tokenizer: PreTrainedTokenizerBase,
    directory: str | Path,
    shots: int = 5,
    subjects: Sequence[str] | None = None,
    limit_per_subject: int | None = None,
    progress: bool = True,
) -> dict:
    """MMLU accuracy of `model` on the data in `directory`: `load_mmlu`, then `score_mmlu`."""
    loaded = load_mmlu(directory, subjects, limit_per_subject, shots)
    return {"directory": str(directory), **score_mmlu(model, tokenizer, loaded, progress=progress)}


def format_table(results: dict) -> str:
    """Accuracy per subject, then the macro and micro averages."""
    lines = [f"{'subject':<40} {'questions':>9} {'accuracy':>9}"]
    for name, subject in results["subjects"].items():
        lines.append(f"{name:<40} {subject['questions']:>9} {subject['accuracy']:>9.4f}")
    macro = f"macro average (mean over {len(results['subjects'])} subjects)"
    lines.append(f"{macro:<40} {results['questions']:>9} {results['macro_accuracy']:>9.4f}")
    lines.append(f"{'micro average (all questions)':<40} {results['questions']:>9} {results['micro_accuracy']:>9.4f}")
    return "\n".join(lines)
