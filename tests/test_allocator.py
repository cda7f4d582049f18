import json
import os
import subprocess
import sys

import pytest

from locas.allocator import keep_freed_memory_unless_disabled

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# In a fresh process: how much resident memory freeing a filled 64 MiB tensor gives back to the system, by
# default and after keep_freed_memory (the second fill of each: the first may grow the heap).
MEASURE = """
import json, os, torch
import sys
from locas.allocator import keep_freed_memory, keep_freed_memory_unless_disabled

def given_back():
    with open("/proc/self/statm") as statm:
        tensor = torch.ones(16 * 2**20)
        resident = int(statm.read().split()[1])
        del tensor
        statm.seek(0)
        return (resident - int(statm.read().split()[1])) * os.sysconf("SC_PAGE_SIZE")

default = [given_back(), given_back()][-1]
if sys.argv[1:]:  # "unless-disabled", on a CPU or not
    kept = keep_freed_memory_unless_disabled(on_cpu=sys.argv[2] == "cpu")
else:
    kept = keep_freed_memory()
print(json.dumps({"default": default, "kept": kept, "after": [given_back(), given_back()][-1]}))
"""


def measure(*arguments: str, environment: dict | None = None) -> dict:
    command = [sys.executable, "-c", MEASURE, *arguments]
    output = subprocess.run(command, capture_output=True, text=True, check=True, env=environment).stdout
    return json.loads(output.strip().splitlines()[-1])


def test_freed_memory_stays_in_the_process():
    measured = measure()
    assert measured["default"] >= 60 * 2**20, measured  # by default the block is handed back at once
    assert measured["kept"] is True
    assert measured["after"] < 2**20, measured  # kept: nothing goes back, so nothing faults in again


def test_it_is_done_unless_disabled():
    environment = {name: value for name, value in os.environ.items() if name != "LOCAS_KEEP_FREED_MEMORY"}
    cases = ((None, "cpu", True), ("1", "cpu", True), ("0", "cpu", False), (None, "cuda", False))
    for setting, device, kept in cases:
        given = environment if setting is None else {**environment, "LOCAS_KEEP_FREED_MEMORY": setting}
        measured = measure("unless-disabled", device, environment=given)
        assert measured["kept"] is kept, (setting, measured)
        assert (measured["after"] < 2**20) if kept else (measured["after"] >= 60 * 2**20), (setting, measured)


@pytest.mark.parametrize("setting", ["yes", "", "2"])
def test_a_setting_other_than_0_or_1_is_refused(monkeypatch, setting):
    monkeypatch.setenv("LOCAS_KEEP_FREED_MEMORY", setting)
    for on_cpu in (True, False):  # refused on a GPU too, where it would change nothing
        with pytest.raises(ValueError, match=f"LOCAS_KEEP_FREED_MEMORY={setting!r}: set it to 1 .* or 0"):
            keep_freed_memory_unless_disabled(on_cpu=on_cpu)
