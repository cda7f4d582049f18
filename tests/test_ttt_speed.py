"""benchmarks/ttt_speed.py on its tiny config: every item timed, the ratios, the breakdown by kind of op and
the floor it gives, the JSON and the plot."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
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


def test_runs_where_nltk_and_gguf_are_missing(tmp_path: Path) -> None:
    """The lent GPU machine's python has torch, transformers and peft but neither nltk nor gguf, and installs
    nothing: the benchmark (and the trainer it imports) must run there as it is."""
    root = Path(__file__).resolve().parents[1]
    code = (
        "import importlib.abc, sys\n"
        "class Missing(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('nltk', 'gguf'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Missing())\n"
        "sys.argv = ['ttt_speed.py', '--model', 'tiny', '--windows', '32', '--batch', '2', '--repeats', '1',\n"
        f"            '--out', {str(tmp_path / 'speed.json')!r}]\n"
        f"import runpy; runpy.run_path({str(root / 'benchmarks' / 'ttt_speed.py')!r}, run_name='__main__')\n"
        "import locas.training.online, locas.evaluation.locomo\n"
        "print('modules', sorted(m for m in sys.modules if m.split('.')[0] in ('nltk', 'gguf')))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "modules []" in done.stdout and (tmp_path / "speed.json").exists()


def test_a_run_cut_short_keeps_the_items_it_measured(tmp_path: Path, monkeypatch) -> None:
    ttt_speed, out = load_ttt_speed(), tmp_path / "speed.json"
    make_learner = ttt_speed.make_learner

    def no_lora(model, config, **options):
        if config.method == "lora":
            raise KeyboardInterrupt  # as a device's time limit would cut the run
        return make_learner(model, config, **options)

    monkeypatch.setattr(ttt_speed, "make_learner", no_lora)
    argv = ["--model", "tiny", "--windows", "32", "--batch", "1", "--repeats", "1", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        ttt_speed.main([*argv, "--items", "forward", "locas_step", "lora_step"])
    (row,) = json.loads(out.read_text())["windows"]
    assert row["forward_s"] > 0 and row["locas_step_s"] > 0 and "lora_step_s" not in row

    results = ttt_speed.main([*argv, "--items", "forward", "locas_step"])
    (row,) = results["windows"]
    assert row["locas_over_forward"] == row["locas_step_s"] / row["forward_s"]
    assert not {"lora_over_locas", "memorize_s", "to_dense_s"} & set(row) and not out.with_suffix(".png").exists()
