"""locas: a parametric memory for HuggingFace causal LMs, learned at test time and mergeable into the weights."""

from locas.families import FAMILIES, family_of, supported_model_types
from locas.memorize import MEMORY_INITS, memorize
from locas.memory import Memory
from locas.merge import to_dense
from locas.model import LocasModel, attach, base_fingerprint, load_memory

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
