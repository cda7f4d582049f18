import ctypes
import resource
import sys

import pytest
import torch

from locas.allocator import _M_MMAP_MAX, _M_TRIM_THRESHOLD, keep_freed_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")


def page_faults_of_a_fresh_tensor() -> int:
    """Minor page faults taken by filling a new 64 MiB tensor (then freed)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.ones(16 * 2**20)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del tensor
    return faults


def test_freed_memory_is_reused_without_page_faults():
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    pages = 64 * 2**20 // resource.getpagesize()
    mallopt(_M_TRIM_THRESHOLD, 128 * 1024)  # glibc's defaults (another test may have run the CLI in this process)
    mallopt(_M_MMAP_MAX, 65536)
    try:
        page_faults_of_a_fresh_tensor()
        assert page_faults_of_a_fresh_tensor() > pages // 2  # by default a block this large comes from mmap
        assert keep_freed_memory()
        page_faults_of_a_fresh_tensor()  # the heap grows once
        assert page_faults_of_a_fresh_tensor() < pages // 10  # then the freed block is reused
    finally:
        keep_freed_memory()  # what the CLI leaves in force
