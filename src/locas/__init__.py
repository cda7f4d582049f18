"""locas: a parametric memory for HuggingFace causal LMs, learned at test time and mergeable into the weights.

The names below are imported on first use, so that `import locas` (and the `locas` command's --help and usage
errors) does not wait for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from locas.config import MEMORY_INITS
    from locas.families import FAMILIES, family_of, supported_model_types
    from locas.initialization import memorize
    from locas.memory import Memory
    from locas.merge import to_dense
    from locas.model import LocasModel, attach, base_fingerprint, load_memory

_MODULE_OF = {
    "FAMILIES": "locas.families",
    "family_of": "locas.families",
    "supported_model_types": "locas.families",
    "MEMORY_INITS": "locas.config",
    "memorize": "locas.initialization",
    "Memory": "locas.memory",
    "to_dense": "locas.merge",
    "LocasModel": "locas.model",
    "attach": "locas.model",
    "base_fingerprint": "locas.model",
    "load_memory": "locas.model",
}
__all__ = [
    "FAMILIES",
    "MEMORY_INITS",
    "LocasModel",
    "Memory",
    "attach",
    "base_fingerprint",
    "family_of",
    "load_memory",
    "memorize",
    "supported_model_types",
    "to_dense",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'locas' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
