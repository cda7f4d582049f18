"""How strong a memory is, relative to each layer's MLP output, under each tau rule, on real models (issue 8).

A memory memorized (`highest`) from the first --tokens tokens of each development book; per layer, its
*equivalent output ratio* under a rule is tau_rule / tau_output(ratio 1): the fraction of the layer's median MLP
output norm that the memory adds with every value vector at unit norm and aligned (the bound clipping allows).
The `output` rule sets it to --output-ratio by construction; `paper` and `neuron` leave it to the model.

    python benchmarks/memory_scale.py                              # SmolLM2-135M and Gemma-3-270M
    python benchmarks/memory_scale.py --models smollm2-135m /path/to/model

Writes JSON (per model, rule and layer, the median over books) and a plot (one panel per model).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from locas.data import window_prefix
from locas.evaluation import pg19
from locas.initialization import memorize
from locas.model import LocasModel, output_scales

REPO = Path(__file__).resolve().parents[1]
PG19 = REPO.parent / "shared" / "data" / "pg19"
FIXED_RULES = ("paper", "neuron")


def equivalent_ratios(model, tokenizer, token_ids: torch.Tensor, width: int) -> dict[str, list[float]]:
    """Per fixed rule, the memory's full output over the layer's median MLP output norm, per layer."""
    prefix = window_prefix(tokenizer)
    ids = torch.cat([torch.tensor(prefix, dtype=torch.long), token_ids]).unsqueeze(0).to(model.device)
    locas_model = LocasModel(model, tau_rule="output", output_ratio=1.0)
    unit = memorize(locas_model, ids, keep_top=width, prefix_length=len(prefix)).tau[:, 0, 0]  # the tau of ratio 1
    locas_model.detach()
    fixed = {"paper": output_scales(model) / width, "neuron": output_scales(model)}  # as `LocasModel.default_tau`
    return {rule: (fixed[rule] / unit).tolist() for rule in FIXED_RULES}


def plot(results: dict, output_ratio: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for axis, (name, rules) in zip(axes[0], results.items(), strict=True):
        for rule, ratios in rules.items():
            axis.plot(range(len(ratios)), ratios, marker="o", label=f"tau rule {rule}")
        axis.axhline(output_ratio, color="grey", linestyle="--", label=f"tau rule output ({output_ratio})")
        axis.set(yscale="log", xlabel="layer", ylabel="memory's full output / median MLP output", title=name)
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize="small")
    figure.tight_layout()
    pg19.save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"], help="as `locas --model`")
    parser.add_argument("--data", type=Path, default=PG19, help="folder of PG-19 books (default: %(default)s)")
    parser.add_argument("--books", type=int, default=4, help="the last N books by file name (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens memorized per book (default: %(default)s)")
    parser.add_argument("--width", type=int, default=64, help="memory slots per layer (default: %(default)s)")
    parser.add_argument("--output-ratio", type=float, default=0.1, help="the output rule's ratio, for the plot")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "memory_scale" / "results.json")
    args = parser.parse_args(argv)
    books = sorted(args.data.glob("*.txt"))[-args.books :]
    if len(books) < args.books:
        parser.error(f"{args.data} holds {len(books)} books (.txt), fewer than --books {args.books}")

    from locas.default_model import load_model

    results = {}
    for name in args.models:
        model, tokenizer = load_model(name)
        per_book = [
            equivalent_ratios(
                model, tokenizer, pg19.read_book(book, tokenizer, args.tokens, args.tokens).token_ids, args.width
            )
            for book in books
        ]
        results[name] = {
            rule: torch.tensor([ratios[rule] for ratios in per_book]).median(dim=0).values.tolist()
            for rule in FIXED_RULES
        }
        for rule, ratios in results[name].items():
            middle = sorted(ratios)[len(ratios) // 2]
            print(
                f"{name}: tau rule {rule}: median over layers {middle:.4f} (layers {min(ratios):.4f}-{max(ratios):.4f})"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pg19.write_json(
        {"books": [book.stem for book in books], "tokens": args.tokens, "width": args.width, "ratios": results},
        args.out,
    )
    plot(results, args.output_ratio, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
