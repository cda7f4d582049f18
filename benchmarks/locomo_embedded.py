"""LoCoMo on the embedded default model (SmolLM2-135M-Instruct): conversations 0 and 1 of locomo10.json
(conv-26 and conv-30, 199 + 105 = 304 questions; also the two with the fewest dialogue tokens, 17.3K and
13.2K), every question, conditions `none` (no dialogue), `full` (the dialogue's last tokens in the prompt),
`locas+full` and `lora+full` (a memory / TempLoRA adapter trained on the whole dialogue, and the dialogue's
last tokens), in one `locas eval locomo` invocation: the same loop and outputs (results.json, locomo.png,
memories/, adapters/).

Settings: the trainer's defaults (chunk 1024, context 2048), answers of at most 32 tokens, and a prompt
window of 2,048 tokens (`--prompt-window 2048`, not the model's 8,192): on 2 CPU cores answering over an
8K-token dialogue took ~8-12 s a question (3 conditions x 304 questions: over 2 hours), over 2K tokens
~1.5-2 s. With 2K the prompt holds ~1.9K of the dialogue's 13-17K tokens, so the memory has the rest to
add. Pass `--prompt-window 8192` for the model's whole window.

    python benchmarks/locomo_embedded.py        # ~1 hour on 2 CPU cores (training locas ~7-10, LoRA ~16-20 min)

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
    parser.add_argument("--prompt-window", default="2048", help="prompt tokens (default: %(default)s)")
    args, passthrough = parser.parse_known_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    methods = [option for condition in CONDITIONS for option in ("--method", condition)]
    command = ["eval", "locomo", str(args.data), *methods, "--conversations", args.conversations]
    return [*command, "--out", str(args.out), "--prompt-window", args.prompt_window, *passthrough]


if __name__ == "__main__":
    sys.exit(main(eval_argv()))
