"""Keep freed memory in the process (glibc on Linux), so that CPU work does not page-fault it back in.

By default glibc hands freed memory back to the system: blocks above its mmap threshold at once, and the top of
the heap whenever its free part passes a trim threshold that glibc sets from the blocks it has seen (64 MiB at
most). A forward of the embedded model allocates and frees each layer's 6 MiB MLP activations and the chunk's
100 MiB logits, and a training step holds a few hundred MiB of activations until its backward, so every chunk
faulted its pages in again: in a PG-19 run of 8,192 tokens, 186K faults a `none` chunk and 25-111K a Locas
step, 22-24 s of the run's 2.6 min in the kernel. With trimming and `mmap` off, freed blocks are reused and
both methods ran 8% faster, at the same peak resident memory.

The `locas` command does this on a CPU unless LOCAS_KEEP_FREED_MEMORY=0. The process's resident memory then
never shrinks, and glibc does not always reuse a freed block at once: a loop that refills one 64 MiB tensor
settles at about 450 MiB resident instead of 64.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENVIRONMENT_VARIABLE = "LOCAS_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed memory for reuse (no trimming, no `mmap`); False where that cannot be done
    (not Linux, or a C library other than glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)) and bool(mallopt(_M_MMAP_MAX, 0))


def keep_freed_memory_unless_disabled() -> bool:
    """`keep_freed_memory()` unless the environment sets LOCAS_KEEP_FREED_MEMORY=0; whether it was done."""
    setting = os.environ.get(ENVIRONMENT_VARIABLE, "1")
    if setting not in ("0", "1"):
        raise ValueError(
            f"{ENVIRONMENT_VARIABLE}={setting!r}: set it to 1 (keep freed memory in the process, the default on "
            "a CPU) or 0 (hand it back to the system)"
        )
    return setting == "1" and keep_freed_memory()
