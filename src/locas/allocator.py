"""Keep freed memory in the process (glibc on Linux), so that CPU work does not page-fault it back in.

By default glibc hands freed memory back to the system: blocks above its mmap threshold at once, and the top of
the heap whenever its free part passes a trim threshold that glibc sets from the blocks it has seen (64 MiB at
most). A forward of the embedded model allocates and frees each layer's 6 MiB MLP activations and the chunk's
100 MiB logits, and a training step holds a few hundred MiB of activations until its backward, so every chunk
faulted its pages in again: in a PG-19 run of 8,192 tokens, 186K faults a `none` chunk and 25-111K a Locas
step, 22-24 s of the run's 2.6 min in the kernel. With trimming and `mmap` off, freed blocks are reused and
both methods ran 8% faster, at the same peak resident memory in that run (2.7-2.8 GB).

The `locas` command does this on a CPU unless LOCAS_KEEP_FREED_MEMORY=0 (the library, imported, leaves the
process's allocator alone). The process's resident memory then never shrinks, and glibc does not always reuse a
freed block at once: a loop that refills one tensor settles at several times its size (64 MiB: ~450 MiB
resident; 100 MiB: 0.8-1.0 GiB, against ~220 MiB by default; 512 MiB: ~1.2 GiB), so set
LOCAS_KEEP_FREED_MEMORY=0 where memory is tight. Threads other than the main one still get blocks above
64 MiB by `mmap` (glibc's per-thread arenas); a CPU step's forward and backward run on the main thread.
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


def keep_freed_memory_unless_disabled(on_cpu: bool) -> bool:
    """`keep_freed_memory()` if `on_cpu` and the environment does not set LOCAS_KEEP_FREED_MEMORY=0; whether it
    was done. The setting is checked either way (ValueError for anything but 0 or 1), so that a mistyped one is
    not silently ignored on a GPU."""
    setting = os.environ.get(ENVIRONMENT_VARIABLE, "1")
    if setting not in ("0", "1"):
        raise ValueError(
            f"{ENVIRONMENT_VARIABLE}={setting!r}: set it to 1 (keep freed memory in the process, the default on "
            "a CPU) or 0 (hand it back to the system)"
        )
    return on_cpu and setting == "1" and keep_freed_memory()
