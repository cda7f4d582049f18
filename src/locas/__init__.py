"""locas: a parametric memory for HuggingFace causal LMs, learned at test time and mergeable into the weights.

The names below are imported on first use, so that `import locas` (and the `locas` command's --help and usage
errors) does not wait for torch and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from locas.lazy_imports import lazy_names

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

__getattr__, __dir__ = lazy_names(__name__, _MODULE_OF)
