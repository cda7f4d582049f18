"""Reading text and cutting token streams into fixed windows; the permissions of the files written."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def read_text(path: str | Path) -> str:
    """The file's text; FileNotFoundError / ValueError with the path for a missing, unreadable or empty file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"text path {str(path)!r} is a folder, not a text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"text file {str(path)!r} is not UTF-8 text ({error.reason})") from error
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} is empty")
    return text


def with_default_permissions(path: str | Path) -> Path:
    """Give a written file (or a folder and everything in it) the permissions a plain `open` would: safetensors
    and `tempfile` create private files (0600), and a checkpoint or memory is for other users and servers to read."""
    path = Path(path)
    umask = _umask()
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)
    return path


def _umask() -> int:
    """The process's umask, read without setting it where Linux shows it (setting it races with other threads)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration):
        umask = os.umask(0)
        os.umask(umask)
        return umask


def first_tokens(tokenizer, text: str, max_tokens: int | None) -> list[int]:
    """The first `max_tokens` tokens of `text` (no special tokens; all of them for None), as tokenising the
    whole text gives them, from tokenising only a prefix: 8 characters per token, doubled until it suffices.

    The prefix ends before a space that follows a non-space, where byte-level BPE (SmolLM2's, Llama 3's) cuts
    words, and it must give more than `max_tokens` tokens, so that at least the one nearest to the cut is
    dropped. A tokenizer may still merge across that point (Gemma's has a few such pieces), so the tokens are
    kept only when a prefix cut at a later point gives the same ones; else the whole text is tokenised.
    """
    if max_tokens is not None and max_tokens < 0:
        raise ValueError(f"max_tokens must be None or at least 0, got {max_tokens}")
    end = len(text) if max_tokens is None else 8 * max(max_tokens, 1)
    shorter, shorter_cut = None, 0  # the kept tokens of the last prefix that had enough, and where it ended
    while end < len(text):
        cut = _word_end(text, end)
        if cut > shorter_cut:
            token_ids = _encode(tokenizer, text[:cut])[: max_tokens + 1]
            if len(token_ids) > max_tokens:
                if token_ids[:max_tokens] == shorter:
                    return shorter
                shorter, shorter_cut = token_ids[:max_tokens], cut
        end *= 2
    return _encode(tokenizer, text)[:max_tokens]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False).input_ids


def _word_end(text: str, end: int) -> int:
    """The index of the last space before `end` that follows a non-space character; -1 if there is none."""
    cut = text.rfind(" ", 1, end)
    while cut > 0 and text[cut - 1].isspace():
        cut = text.rfind(" ", 1, cut)
    return cut


def window_prefix(tokenizer) -> list[int]:
    """The tokens every window of a text must start with: `[bos]` when the tokenizer puts one in front of
    each text by itself (Gemma, Llama 2/3: models trained to always see it), else none (SmolLM2, GPT-2)."""
    bos = None if tokenizer is None else getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None and tokenizer("a").input_ids[:1] == [bos] else []


def split_windows(
    token_ids: torch.Tensor, window: int, pad_id: int = 0, prefix: list[int] | tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a 1-D token stream into rows of `window` tokens, each after `prefix` (see `window_prefix`), the
    last row right-padded.

    Returns (input_ids, attention_mask), both (rows, len(prefix) + the longest piece): as wide as
    `len(prefix) + window` unless the stream is shorter. A last piece of a single token is dropped, since it holds
    no prediction.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    token_ids = token_ids.flatten()
    pieces = [piece for piece in token_ids.split(window) if piece.numel() >= 2]
    if not pieces:
        raise ValueError(f"need at least 2 tokens, got {token_ids.numel()}")
    width = len(prefix) + max(piece.numel() for piece in pieces)
    input_ids = torch.full((len(pieces), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(pieces), width), dtype=torch.long)
    for row, piece in enumerate(pieces):
        filled = len(prefix) + piece.numel()
        input_ids[row, :filled] = torch.cat([torch.tensor(prefix, dtype=torch.long), piece])
        attention_mask[row, :filled] = 1
    return input_ids, attention_mask
