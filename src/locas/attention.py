"""CPU training: grouped-query attention runs with its keys and values repeated for every query head.

transformers' sdpa attention hands a grouped-query layer's keys and values to `scaled_dot_product_attention`
with `enable_gqa=True` when there is no mask. On CPU, that kernel's backward is slower than the same attention
with the keys and values repeated first: on the embedded SmolLM2 shape (9 query heads, 3 key/value heads,
1,024 tokens) at 2 threads, 58 ms against 51 ms per layer (equal at 1 thread, so it is parallelism lost over
the few key/value heads). The repeat is transformers' own path for masked attention (`repeat_kv`); the
results differ by rounding only, in the order the key/value gradients are summed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.integrations import sdpa_attention


def _never(*args, **kwargs) -> bool:  # one object, so that a compiled forward keeps one guard on it
    return False


@contextmanager
def keys_and_values_per_query_head(device: torch.device) -> Iterator[None]:
    """While training on CPU (gradients on), sdpa attention repeats grouped keys and values per query head;
    elsewhere (a GPU, no gradients, a transformers without this switch) nothing changes."""
    original = getattr(sdpa_attention, "use_gqa_in_sdpa", None)
    if torch.device(device).type != "cpu" or not torch.is_grad_enabled() or original is None:
        yield
        return
    sdpa_attention.use_gqa_in_sdpa = _never
    try:
        yield
    finally:
        sdpa_attention.use_gqa_in_sdpa = original
