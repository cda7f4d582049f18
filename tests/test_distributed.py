"""One evaluation over several processes: books shared by rank, results gathered on rank 0, and a 2-process
`torchrun` launch of `locas eval pg19` giving the numbers of a single process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_pg19 import TINY, run_quietly, write_model_and_books

from locas.evaluation.distributed import SINGLE_PROCESS, Ranks, process_group


def test_book_i_goes_to_rank_i_mod_world_size() -> None:
    books = list("abcdefg")
    shares = [Ranks(rank, 3).share(books) for rank in range(3)]
    assert shares == [["a", "d", "g"], ["b", "e"], ["c", "f"]]
    assert SINGLE_PROCESS.share(books) == books and SINGLE_PROCESS.is_main


def test_a_single_process_needs_no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with process_group("cpu") as (ranks, device):
        assert (ranks, device) == (SINGLE_PROCESS, "cpu")
        assert ranks.gather([1, 2]) == [1, 2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_give_the_numbers_of_one(tmp_path: Path, one_thread: None) -> None:
    files = write_model_and_books(tmp_path)
    (tmp_path / "d.txt").write_text(files["b"].read_text(encoding="utf-8")[::-1], encoding="utf-8")
    books = [files["a"], files["b"], tmp_path / "d.txt"]  # rank 0: a and d, rank 1: b
    argv = ["eval", "pg19", *books, "--model", files["model"], "--method", "none", "--method", "locas", *TINY]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()

    code, stdout = run_quietly(*argv, "--out", tmp_path / "one" / "results.json")
    assert code == 0, stdout
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launcher += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.run(
        [*launcher, "-m", "locas", *map(str, argv), "--out", str(tmp_path / "two" / "results.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
        check=False,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stdout.count("wrote ") == 1  # rank 0 alone prints and writes the results

    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (one["settings"]["world_size"], two["settings"]["world_size"]) == (1, 2)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["results.json", "results.png", "results.state"]
    assert {name: rows["none"]["rank"] for name, rows in two["books"].items()} == {"a": 0, "b": 1, "d": 0}
    for name, rows in one["books"].items():
        for label, row in rows.items():
            other = two["books"][name][label]
            assert other["tokens"] == row["tokens"]
            assert other["curve"]["ppl"] == pytest.approx(row["curve"]["ppl"], rel=1e-6), (name, label)
    for label, method in one["aggregate"].items():
        for key in ("tokens", "nll_sum", "ppl", "mean_book_ppl", "bits_per_byte"):
            assert two["aggregate"][label][key] == pytest.approx(method[key], rel=1e-6), (label, key)
