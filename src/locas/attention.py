"""CPU training: grouped-query attention runs with its keys and values repeated for every query head.

transformers' sdpa attention hands a grouped-query layer's keys and values to `scaled_dot_product_attention`
with `enable_gqa=True` when there is no mask. On CPU, that kernel's backward is slower than the same attention
with the keys and values repeated first: on the embedded SmolLM2 shape (9 query heads, 3 key/value heads,
1,024 tokens) at 2 threads, 58 ms against 51 ms per layer (equal at 1 thread, so it is parallelism lost over
the few key/value heads). The repeat is transformers' own path for masked attention (`repeat_kv`); the
results differ by rounding only, in the order the key/value gradients are summed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel
from transformers.integrations import sdpa_attention

_lock = threading.Lock()
_users = 0  # contexts open now, in any thread; the switch is undone when the last one closes
_original = None


def _never(*args, **kwargs) -> bool:  # one object, so that a compiled forward keeps one guard on it
    return False


@contextmanager
def keys_and_values_per_query_head(model: PreTrainedModel) -> Iterator[None]:
    """While `model` (in eval mode, on a CPU) runs with gradients on, sdpa attention repeats grouped keys and
    values per query head. Elsewhere nothing changes: a GPU, no gradients, a model in training mode (whose
    gradient checkpointing would recompute the forward outside this context), a transformers without the switch."""
    global _users, _original
    if (
        model.device.type != "cpu"
        or model.training
        or not torch.is_grad_enabled()
        or not hasattr(sdpa_attention, "use_gqa_in_sdpa")
    ):
        yield
        return
    with _lock:
        if _users == 0:
            _original = sdpa_attention.use_gqa_in_sdpa
            sdpa_attention.use_gqa_in_sdpa = _never
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                sdpa_attention.use_gqa_in_sdpa = _original
