"""Speed of one test-time training step against a forward pass, measured in one run (issue: speed).

For each window W (tokens in one forward: a chunk of W/2 scored tokens after W/2 tokens of context, as
the online trainer reads a long text), times the median of `--repeats` calls of:

    forward      the `none` method's chunk: the backbone without gradients, and the chunk's NLL
    locas step   the trainer's score-first Locas step (`train_chunk`: forward + backward + AdamW + clipping)
    lora step    the same step for a TempLoRA adapter of the same rank (peft)
    memorize     picking and cloning the memory's neurons from one chunk
    to_dense     merging the memory into a vanilla checkpoint
    batch B      the Locas step over B documents at once, each with its own memory (tokens/s vs one)

and writes the ratios locas/forward, lora/locas and batched/single throughput, the forward's achieved
TFLOP/s, and peak memory to JSON, plus a bar chart of the ratios. Models: random-weight Qwen3 shapes
(`--model qwen3-0.6b|qwen3-1.7b|qwen3-4b`, no download), `tiny` (CPU-sized), or any name or path that
`locas.default_model.load_model` takes (`default`: the embedded SmolLM2-135M).

    python benchmarks/ttt_speed.py --model tiny --windows 256 1024              # CPU, a minute
    python benchmarks/ttt_speed.py --model default --windows 1024 --batch 2     # the embedded model
    python benchmarks/ttt_speed.py --model qwen3-1.7b --dtype bfloat16          # on a GPU
    python benchmarks/ttt_speed.py --model qwen3-1.7b --dtype bfloat16 --compile reduce-overhead

With `--compile MODE` the forward and every step run through `torch.compile` (the trainer's `--compile`), and
each also reports its first call with inductor's on-disk cache empty (`*_compile_cold_s`: a new cache folder per
item) and warm (`*_compile_warm_s`: the same compilation again after `torch._dynamo.reset()`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch

from locas.allocator import keep_freed_memory_unless_disabled
from locas.evaluation.pg19 import save_figure, write_json
from locas.initialization import memorize
from locas.merge import to_dense
from locas.training.config import COMPILE_MODES, OnlineConfig
from locas.training.online import _optimizer, make_learner, train_chunk

REPO = Path(__file__).resolve().parents[1]
QWEN3_SHAPES = {  # hidden, MLP width, layers, attention heads, key/value heads (head_dim 128, vocab 151,936)
    "qwen3-0.6b": (1024, 3072, 28, 16, 8),
    "qwen3-1.7b": (2048, 6144, 28, 16, 8),
    "qwen3-4b": (2560, 9728, 36, 32, 8),
}
ITEMS = ("forward", "locas_step", "lora_step", "locas_batch_step", "memorize", "to_dense")


def build_model(name: str, dtype: torch.dtype, device: str):
    """A random-weight model of a known shape, or a real one through locas' loader."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    if name == "tiny" or name in QWEN3_SHAPES:
        hidden, width, layers, heads, kv_heads = QWEN3_SHAPES.get(name, (256, 768, 4, 4, 2))
        config = Qwen3Config(
            vocab_size=151_936 if name != "tiny" else 8192,
            hidden_size=hidden,
            intermediate_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=128 if name != "tiny" else 64,
            max_position_embeddings=40_960,
            attn_implementation="sdpa",
        )
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model.eval()
    from locas.default_model import load_model

    model, _ = load_model(None if name == "default" else name, dtype=dtype, device=device)
    return model


def median_seconds(function: Callable[[], object], repeats: int, device: torch.device, warm_up: bool = True) -> float:
    """Median wall time of `repeats` calls, after one warm-up call unless `warm_up` is False."""

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if warm_up:
        function()
    times = []
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        function()
        synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def forward_flops(model, tokens: int, kept: int) -> float:
    """Multiply-adds x 2 of one forward: the decoder's matrices, causal attention scores, the kept logits."""
    config = model.config
    embedding = model.get_input_embeddings().weight
    decoder = sum(p.numel() for name, p in model.named_parameters() if ".layers." in name and p.dim() == 2)
    head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    attention = 2 * config.num_hidden_layers * config.num_attention_heads * head_dim * tokens * tokens  # QK^T + AV, /2
    return 2.0 * decoder * tokens + attention + 2.0 * kept * embedding.numel()


def time_by_kind(function: Callable[[], object], device: torch.device) -> dict:
    """Seconds of one call spent in each kind of op (torch.profiler, self time on the device that ran it):
    matmuls, attention (sdpa's kernels), attention backward, everything else."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    kinds = {"matmul": 0.0, "attention": 0.0, "attention_backward": 0.0, "other": 0.0}
    for event in profiler.key_averages():
        name = event.key
        if name.startswith("aten::") and "attention" in name:
            kind = "attention_backward" if "backward" in name else "attention"
        elif name in ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"):
            kind = "matmul"
        elif name.startswith("aten::"):
            kind = "other"
        else:
            continue  # autograd and profiler bookkeeping: their ops are counted by name
        seconds = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        kinds[kind] += seconds / 1e6
    return kinds


def peak_memory_gib(device: torch.device) -> float:
    """The process's peak so far: the GPU's since its last reset, or the resident set on a CPU (never reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (Linux: KiB)


def measure_window(model, window: int, args, device: torch.device, row: dict, on_item: Callable[[], None]) -> dict:
    """Fill `row` with the items of `args.items` for this window, calling `on_item` after each one (the results
    so far are written then: a run cut short keeps them)."""
    chunk = window // 2
    generator = torch.Generator().manual_seed(window)
    documents = [torch.randint(0, model.config.vocab_size, (window,), generator=generator) for _ in range(args.batch)]
    start = window - chunk  # the last chunk: `chunk` scored tokens after `window - chunk` of context
    common = dict(chunk_size=chunk, context_window=window - chunk, steps_per_chunk=1)
    row.update(window=window, chunk=chunk)

    def step_timer(method: str, rows: list[int], name: str, **options) -> None:
        config = OnlineConfig(method=method, compile=args.compile, **common, **options).resolved()
        learner = make_learner(model, config, batch_size=len(rows))
        try:
            learner.prepare(config.memorize_at, [documents[r][:chunk] for r in rows], rows)
            optimizer = _optimizer(learner.parameter_groups(), config)
            timed(name, lambda: train_chunk(learner, optimizer, documents, rows, start, config))
        finally:
            learner.close()

    def timed(name: str, function: Callable[[], object]) -> None:
        """`name`_s: the median call. Compiled, also the first call (`name`_compile_cold_s: compiling into a new,
        empty on-disk cache; kernels that an earlier item compiled in this process may still come from memory) and
        the first call after dynamo forgot it (`name`_compile_warm_s: the same compilation, from that cache).
        On a GPU, also the item's own peak memory (`name`_peak_memory_gib)."""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if args.compile == "off":
            row[f"{name}_s"] = median_seconds(function, args.repeats, device)
            if args.breakdown and name in ("forward", "locas_step"):
                row[f"{name}_by_kind_s"] = time_by_kind(function, device)
        else:
            torch._dynamo.reset()
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="locas-inductor-")  # read at each compile
            row[f"{name}_compile_cold_s"] = median_seconds(function, 1, device, warm_up=False)
            row[f"{name}_s"] = median_seconds(function, args.repeats, device, warm_up=False)
            torch._dynamo.reset()
            row[f"{name}_compile_warm_s"] = median_seconds(function, 1, device, warm_up=False)
        done(name)

    def eager(name: str, function: Callable[[], object], repeats: int = args.repeats) -> None:
        """`name`_s for work that is never compiled."""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row[f"{name}_s"] = median_seconds(function, repeats, device)
        done(name)

    def done(name: str) -> None:
        if device.type == "cuda":
            row[f"{name}_peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"window {window} {name}: {row[f'{name}_s']:.4g} s", flush=True)
        on_item()

    input_ids = documents[0].unsqueeze(0).to(device)
    if "forward" in args.items:
        none = OnlineConfig(method="none", compile=args.compile, **common).resolved()
        none_learner = make_learner(model, none)
        try:
            timed("forward", lambda: train_chunk(none_learner, None, documents, [0], start, none))
        finally:
            none_learner.close()
    if "locas_step" in args.items:
        step_timer("locas", [0], "locas_step", width=args.rank)
    if "lora_step" in args.items:
        step_timer("lora", [0], "lora_step", lora_rank=args.rank, lora_alpha=float(args.rank))
    if args.batch > 1 and "locas_batch_step" in args.items:
        row["batch"] = args.batch
        step_timer("locas", list(range(args.batch)), "locas_batch_step", width=args.rank)

    from locas.model import LocasModel

    if {"memorize", "to_dense"} & set(args.items):
        locas_model = LocasModel(model)
        try:
            with torch.no_grad():
                if "memorize" in args.items:
                    eager("memorize", lambda: memorize(locas_model, input_ids[:, :chunk], keep_top=args.rank))
                memory = memorize(locas_model, input_ids[:, :chunk], keep_top=args.rank)
                if "to_dense" in args.items:
                    eager("to_dense", lambda: to_dense(locas_model, memory), repeats=1)
        finally:
            locas_model.detach()
    for ratio, (numerator, denominator, factor) in {
        "locas_over_forward": ("locas_step_s", "forward_s", 1),
        "lora_over_locas": ("lora_step_s", "locas_step_s", 1),
        "batch_speedup": ("locas_step_s", "locas_batch_step_s", args.batch),
    }.items():
        if numerator in row and denominator in row:
            row[ratio] = factor * row[numerator] / row[denominator]
    if args.breakdown and args.compile == "off" and {"forward", "locas_step"} <= set(args.items):
        forward, step = row["forward_by_kind_s"], row["locas_step_by_kind_s"]
        # One forward plus a backward that computes activation gradients only: its matmuls cost the forward's,
        # its attention what the attention backward kernel costs; the element-wise rest counted once more.
        floor = 2 * sum(forward.values()) - forward["attention"] + step["attention_backward"]
        row["floor_over_forward"] = floor / sum(forward.values())
    if "forward_s" in row:
        row["forward_tflops"] = forward_flops(model, window, chunk) / row["forward_s"] / 1e12
    peaks = [value for key, value in row.items() if key.endswith("_peak_memory_gib")]
    row["peak_memory_gib"] = max(peaks) if peaks else peak_memory_gib(device)
    on_item()
    return row


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["windows"]
    labels = ["locas step / forward", "lora step / forward"] + (["batch speed-up / B"] if "batch" in rows[0] else [])
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(rows)
    for index, row in enumerate(rows):
        values = [row["locas_over_forward"], row["lora_step_s"] / row["forward_s"]]
        if "batch" in row:
            values.append(row["batch_speedup"] / row["batch"])
        positions = [i + index * width for i in range(len(values))]
        axis.bar(positions, values, width, label=f"window {row['window']}")
    axis.set_xticks([i + width * (len(rows) - 1) / 2 for i in range(len(labels))], labels)
    axis.axhline(2.2, color="gray", linestyle="--", linewidth=1)
    axis.set_ylabel("ratio")
    axis.set_title(f"{results['model']} ({results['dtype']}, {results['device']}), r={results['rank']}")
    axis.legend()
    figure.tight_layout()
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, qwen3-0.6b, qwen3-1.7b, qwen3-4b, default, or a path")
    parser.add_argument("--windows", type=int, nargs="+", default=[1024, 4096], help="tokens per forward")
    parser.add_argument("--rank", type=int, default=64, help="memory width = LoRA rank")
    parser.add_argument("--batch", type=int, default=8, help="documents in the batched step (1: skip)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--compile",
        default="off",
        choices=COMPILE_MODES,
        help="time the forward and the steps compiled in this torch.compile mode, with their compile times "
        "cold (inductor's cache in a new empty folder) and warm (the same compilation again, from that cache)",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also profile one forward and one Locas step (one call each) by kind of op (matmul, attention, "
        "attention backward, other) and estimate the step's floor: a forward plus a backward of activation "
        "gradients only (eager only)",
    )
    parser.add_argument(
        "--items",
        nargs="+",
        choices=ITEMS,
        default=list(ITEMS),
        help="what to time (default: all; the ratios need their two items)",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "runs" / "ttt_speed.json", help="results (.json), rewritten after each item"
    )
    args = parser.parse_args(argv)
    if args.breakdown and args.compile != "off":
        parser.error("--breakdown profiles the eager ops; drop --compile or --breakdown")
    device = torch.device(args.device)
    try:
        kept = keep_freed_memory_unless_disabled(on_cpu=device.type == "cpu")  # as the locas command does
    except ValueError as error:
        parser.error(str(error))
    model = build_model(args.model, getattr(torch, args.dtype), args.device)
    results = {
        "model": args.model,
        "dtype": args.dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "rank": args.rank,
        "compile": args.compile,
        "keep_freed_memory": kept,
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "windows": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for window in args.windows:
        row: dict = {}
        results["windows"].append(row)
        measure_window(model, window, args, device, row, on_item=lambda: write_json(results, args.out))
        print(json.dumps(row), flush=True)
    if {"forward", "locas_step", "lora_step"} <= set(args.items):
        plot(results, args.out.with_suffix(".png"))
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    else:
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
