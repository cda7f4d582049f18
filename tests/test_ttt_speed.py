"""benchmarks/ttt_speed.py on its tiny config: every item timed, the ratios, the breakdown by kind of op and
the floor it gives, the JSON and the plot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("offline", "one_thread")


def load_ttt_speed():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ttt_speed.py"
    spec = importlib.util.spec_from_file_location("ttt_speed", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ttt_speed"] = module
    spec.loader.exec_module(module)
    return module


def test_the_tiny_run_writes_every_measurement(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    argv = ["--model", "tiny", "--windows", "32", "--batch", "2", "--repeats", "1", "--breakdown", "--out", str(out)]
    results = load_ttt_speed().main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    (row,) = results["windows"]
    assert (row["window"], row["chunk"], row["batch"]) == (32, 16, 2)
    for name in ("forward", "locas_step", "lora_step", "locas_batch_step", "memorize", "to_dense"):
        assert row[f"{name}_s"] > 0, name
    assert row["locas_over_forward"] == row["locas_step_s"] / row["forward_s"]
    assert row["lora_over_locas"] == row["lora_step_s"] / row["locas_step_s"]
    assert row["batch_speedup"] == 2 * row["locas_step_s"] / row["locas_batch_step_s"]

    forward, step = row["forward_by_kind_s"], row["locas_step_by_kind_s"]
    assert forward["attention_backward"] == 0 < forward["attention"] and forward["matmul"] > 0
    assert step["attention_backward"] > 0 and step["matmul"] > 0
    total = sum(forward.values())
    floor = 2 * total - forward["attention"] + step["attention_backward"]
    assert row["floor_over_forward"] == pytest.approx(floor / total)
