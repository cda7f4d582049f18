"""LoCoMo on the embedded default model (SmolLM2-135M-Instruct): conversations 0 and 1 of locomo10.json
(conv-26 and conv-30, 199 + 105 = 304 questions; also the two with the fewest dialogue tokens, 17.3K and
13.2K), every question, conditions `none` (no dialogue), `full` (the dialogue in the 8K prompt),
`locas+full` and `lora+full` (a memory / TempLoRA adapter trained on the dialogue, and the dialogue), in one
`locas eval locomo` invocation: the same loop and outputs (results.json, locomo.png, memories/, adapters/).

Full run (chunk 1024, context 2048, answers of at most 32 tokens; an estimated 2 hours on one thread of a
busy 2-core CPU, peak memory about 12 GB: from a 3-question run on conv-30 that took 26 minutes, of which
training locas 7 and LoRA 16 minutes, each condition's 8K-token dialogue prefix ~55 s, then ~3 s a question):

    python benchmarks/locomo_embedded.py

A trained memory or adapter is kept in the output folder, so after Ctrl-C the same command trains only
what is missing. Any other `locas eval locomo` option passes through, e.g. `--max-questions 3` or
`--abstain-hint`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Attention on the key/value heads instead of repeated copies of them (transformers' switch; the same
# answers): with a batch of questions over an 8K-token cache this makes answering ~1.8x faster on CPU.
os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")

from locas.cli import main

REPO = Path(__file__).resolve().parents[1]
LOCOMO = REPO.parent / "shared" / "data" / "locomo" / "locomo10.json"
CONDITIONS = ("none", "full", "locas+full", "lora+full")


def eval_argv(argv: list[str] | None = None) -> list[str]:
    """The `locas eval locomo` command line of the benchmark, with this script's options applied."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=LOCOMO, help="locomo10.json (default: %(default)s)")
    parser.add_argument("--conversations", default="0,1", help="indices or sample ids (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "locomo_embedded", help="output folder")
    args, passthrough = parser.parse_known_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    methods = [option for condition in CONDITIONS for option in ("--method", condition)]
    command = ["eval", "locomo", str(args.data), *methods, "--conversations", args.conversations]
    return [*command, "--out", str(args.out), *passthrough]


if __name__ == "__main__":
    sys.exit(main(eval_argv()))
