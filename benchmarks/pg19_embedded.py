"""PG-19 on the embedded default model (SmolLM2-135M): the backbone with the same window (`none`), Locas
with its two inits (`locas:highest`, `locas:random_index`) and TempLoRA r=64 (`lora`), in one
`locas eval pg19` invocation: the same runner, state, resume and outputs (results JSON + plot).

Full run (first 16K tokens of the first 2 books, chunk 1024, context 2048; about an hour on 2 CPU cores;
after Ctrl-C the same command resumes):

    python benchmarks/pg19_embedded.py

Any other `locas eval pg19` option passes through, e.g. `--chunk-size 512 --context-window 1024 --lr 1e-3`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from locas.cli import main

REPO = Path(__file__).resolve().parents[1]
PG19 = REPO.parent / "shared" / "data" / "pg19"
METHODS = ("none", "locas:highest", "locas:random_index", "lora")


def eval_argv(argv: list[str] | None = None) -> list[str]:
    """The `locas eval pg19` command line of the benchmark, with this script's options applied."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=PG19, help="folder of PG-19 books (default: %(default)s)")
    parser.add_argument("--books", type=int, default=2, help="evaluate the first N books by file name")
    parser.add_argument("--max-tokens", default="16384", help="tokens read per book (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "pg19_embedded" / "results.json")
    args, passthrough = parser.parse_known_args(argv)
    books = sorted(args.data.glob("*.txt"))[: args.books]
    if len(books) < args.books:
        parser.error(f"{args.data} holds {len(books)} books (.txt), fewer than --books {args.books}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    methods = [option for method in METHODS for option in ("--method", method)]
    return ["eval", "pg19", *map(str, books), *methods, "--max-tokens", args.max_tokens, "--out", str(args.out)] + (
        passthrough
    )


if __name__ == "__main__":
    sys.exit(main(eval_argv()))
