"""The `locas` command: argument parsing, progress and exit codes; the work lives in the library."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import torch

    from locas.evaluation.locomo import Conversation
    from locas.memory import Memory
    from locas.training.config import OnlineConfig

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# `locas memorize` trains the memory it writes (its values start at zero: untrained, it changes nothing). The main
# job's setting: 5 NTP steps at 1e-2 took book 349's first 4,096 tokens from perplexity 38.98 to 11.75.
MEMORIZE_TRAIN_STEPS = 5
MEMORIZE_LR = {"ntp": 1e-2, "grpo": 4e-3}  # GRPO (and ntp+grpo): the trainer's paper lr


class CommandError(Exception):
    """A user-facing problem: printed as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `locas COMMAND: error: ...`, pointing at --help for the usage."""

    def error(self, message: str):
        usage_error(self.prog, message)


def usage_error(prog: str, message: str) -> NoReturn:
    """Print `PROG: error: MESSAGE (see 'PROG --help')` and exit with the usage status."""
    sys.stderr.write(f"{prog}: error: {message} (see '{prog} --help')\n")
    sys.exit(EXIT_USAGE)


def _number(text: str, kind: type) -> int | float:
    """`text` as an int or float; argparse then says "must be an integer, got 'abc'", not the function's name."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def at_least_two(text: str) -> int:
    value = _number(text, int)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (tokens), got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {value}")
    return value


def group_size(text: str) -> int:
    value = _number(text, int)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (advantages compare a prompt's samples), got {value}")
    return value


def clip_range(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 0 and < 1, got {value}")
    return value


def fraction(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def positive_fraction(text: str) -> float:
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {value}")
    return value


def category(text: str) -> int:
    from locas.evaluation.config import CATEGORIES

    value = _number(text, int)
    if value not in CATEGORIES:
        raise argparse.ArgumentTypeError(f"LoCoMo categories are {min(CATEGORIES)}-{max(CATEGORIES)}, got {value}")
    return value


def comma_list(item: Callable[[str], object]) -> Callable[[str], list]:
    """An argparse type: one or more comma-separated values, each read by `item`."""

    def parse(text: str) -> list:
        parts = [part.strip() for part in text.split(",")]
        try:
            if not all(parts):
                raise ValueError
            return [item(part) for part in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated values, e.g. 0,3; got {text!r}") from None

    return parse


def _checked_device(args) -> torch.device | None:
    """--device (None when not given), checked once torch is imported (parsing never imports it); a bad one is
    a usage error."""
    import torch

    if getattr(args, "device", None) is None:
        return None
    try:
        device = torch.device(args.device)
    except RuntimeError:
        problem = f"{args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)"
    else:
        if device.type != "cuda" or torch.cuda.is_available():
            return device
        problem = f"{args.device!r}: CUDA is not available here; use --device cpu"
    raise CommandError(f"argument --device: {problem} (see 'locas {args.command} --help')")


def _load(args, device: str | None = None):
    """The model and tokenizer of --model, --dtype, on `device` (default: --device)."""
    import torch

    from locas.default_model import load_model

    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    return load_model(args.model, dtype=dtype, device=device or args.device)


def _weights_dtype(model) -> str:
    """The dtype the weights were loaded in, for results and resume checks (`--dtype auto` depends on the device)."""
    return str(model.dtype).removeprefix("torch.")


def _read_memory(path: str) -> Memory:
    """The memory file, read before the model is loaded so that a wrong path fails fast."""
    from locas.memory import Memory

    try:
        return Memory.load(path)
    except (OSError, ValueError, KeyError) as error:
        raise CommandError(f"{error}; pass a memory file written by 'locas memorize'") from error


def _tokens(tokenizer, text: str, path: str, max_tokens: int | None) -> torch.Tensor:
    import torch

    from locas.data import first_tokens

    token_ids = torch.tensor(first_tokens(tokenizer, text, max_tokens), dtype=torch.long)
    if token_ids.numel() < 2:
        raise CommandError(f"text file {path!r} holds fewer than 2 tokens: nothing to predict; use a longer text")
    return token_ids


def _windows(model, tokenizer, token_ids: torch.Tensor, window: int):
    """The text in rows of --window tokens (after the tokenizer's prefix), checked against the model's positions."""
    from locas.data import split_windows, window_prefix
    from locas.model import positions

    prefix = window_prefix(tokenizer)
    input_ids, attention_mask = split_windows(token_ids, window, pad_id=tokenizer.pad_token_id or 0, prefix=prefix)
    learned, trained = positions(model)
    extra = f" (+ {len(prefix)} prefix token)" if prefix else ""
    if learned is not None and input_ids.shape[1] > learned:
        raise CommandError(
            f"--window {window}: windows of {input_ids.shape[1] - len(prefix)} tokens{extra}, but this model has "
            f"{learned} positions; use --window {learned - len(prefix)} or less"
        )
    if trained is not None and input_ids.shape[1] > trained:
        warnings.warn(
            f"--window {window}: windows of {input_ids.shape[1] - len(prefix)} tokens{extra} run past the "
            f"{trained} positions this model was trained on (max_position_embeddings); its predictions there are "
            "extrapolation",
            stacklevel=2,
        )
    return input_ids, attention_mask


def _score(model, tokenizer, input_ids, attention_mask, batch_size: int = 4) -> dict:
    """Total NLL over all windows, perplexity and bits per byte of the predicted text (a progress bar on stderr
    for texts of more than 8 batches of windows: a whole book at the default window takes minutes on a CPU)."""
    from tqdm.auto import tqdm

    total_nll, predicted, predicted_bytes = 0.0, 0, 0
    starts = range(0, input_ids.shape[0], batch_size)
    for start in tqdm(starts, desc="scoring", unit="batch", leave=False, disable=len(starts) <= 8):
        ids = input_ids[start : start + batch_size].to(model.device)
        mask = attention_mask[start : start + batch_size].to(model.device)
        total_nll += model.compute_nll(ids, attention_mask=mask).sum().item()
        for row, row_mask in zip(ids, mask, strict=True):
            targets = row[row_mask.bool()][1:]
            predicted += targets.numel()
            predicted_bytes += len(tokenizer.decode(targets).encode("utf-8"))
    mean = total_nll / predicted
    return {
        "tokens": predicted,
        "nll": mean,
        "perplexity": math.exp(mean),
        "bits_per_byte": total_nll / math.log(2) / max(predicted_bytes, 1),
    }


def _locas_model(model, memory: Memory | None, **options):
    from locas.model import LocasModel

    return LocasModel(model, memory=memory, **options)  # a refused memory leaves no hooks behind


def _check_output_path(path: Path, suffix: str | None = None) -> None:
    stem = "memory" if suffix == ".safetensors" else "results"
    if suffix and path.is_dir():
        raise CommandError(f"--out {str(path)!r} is a folder; name a file in it, e.g. --out {str(path / stem)}{suffix}")
    if suffix and path.suffix != suffix:
        hint = path.parent / ((path.stem or stem) + suffix)
        raise CommandError(f"--out {str(path)!r} should end in {suffix}, e.g. --out {str(hint)!r}")
    if not path.parent.is_dir():
        raise CommandError(f"the folder of --out {str(path)!r} does not exist; create it first")
    try:  # before any work: a folder it may not write in would lose it at the end
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as error:
        raise CommandError(
            f"cannot write in the folder of --out {str(path)!r} ({error.strerror}); choose another folder"
        ) from error


# --- commands ------------------------------------------------------------------------------------


def command_memorize(args) -> None:
    from locas.data import read_text, window_prefix
    from locas.training import train_on_windows
    from locas.training.grpo import grpo_train_text, mean_recall_reward

    out = Path(args.out)
    _check_output_path(out, ".safetensors")
    if out.exists():
        raise CommandError(f"--out {str(out)!r} exists and a memory is never overwritten; delete it or choose another")
    if args.train_steps == 0:
        ignored = [flag for flag, value in (("--loss", args.loss), ("--lr", args.lr)) if value is not None]
        if ignored:
            named = " and ".join(ignored)
            raise CommandError(
                f"{named} {'set' if len(ignored) > 1 else 'sets'} what --train-steps trains, and --train-steps is "
                f"0; drop {named} or train (e.g. --train-steps {MEMORIZE_TRAIN_STEPS})"
            )
    args.loss = args.loss or "ntp"
    args.lr = args.lr or MEMORIZE_LR["ntp" if args.loss == "ntp" else "grpo"]
    objective = _online_config(args)  # --loss and the --grpo-* options: what --train-steps trains
    grpo = objective.grpo_settings() if args.train_steps and objective.uses_grpo else None
    text = read_text(args.text_file)
    model, tokenizer = _load(args)
    token_ids = _tokens(tokenizer, text, args.text_file, args.max_tokens)
    if grpo and token_ids.numel() < grpo.prompt_tokens + grpo.continuation_tokens:
        raise CommandError(
            f"--loss {args.loss}: the text has {token_ids.numel()} tokens, fewer than one recall prompt and its "
            f"continuation (--grpo-prompt-tokens {grpo.prompt_tokens} + --grpo-continuation-tokens "
            f"{grpo.continuation_tokens}); lower them or use a longer text"
        )
    input_ids, attention_mask = _windows(model, tokenizer, token_ids, args.window)
    locas_model = _locas_model(model, None, tau_rule=args.tau_rule, output_ratio=args.output_ratio or 0.1)
    memory = locas_model.memorize(
        input_ids.to(locas_model.device),
        attention_mask=attention_mask.to(locas_model.device),
        keep_top=args.width,
        memory_init=args.init,
        seed=args.seed,
        prefix_length=len(window_prefix(tokenizer)),  # <bos> (Gemma): run, not scored
    )
    print(f"memorized {token_ids.numel()} tokens into {memory.width} slots x {memory.num_layers} layers ({args.init})")
    if not args.train_steps:
        inert = "" if memory.down.any() else ": its values are zero, so the model is unchanged"  # (init gradient)
        print(f"not trained (--train-steps 0){inert}")
    else:
        rewards = []  # GRPO's, before and after all training, on a draw no step trains on (index train_steps)
        if grpo:
            rewards.append(mean_recall_reward(locas_model, token_ids, tokenizer, grpo, args.train_steps))
        if objective.token_loss:
            losses = train_on_windows(locas_model, input_ids, attention_mask, steps=args.train_steps, lr=args.lr)
        if grpo:
            grpo_train_text(locas_model, token_ids, tokenizer, grpo, args.train_steps, lr=args.lr)
            rewards.append(mean_recall_reward(locas_model, token_ids, tokenizer, grpo, args.train_steps))
        if objective.token_loss:
            after = _score(locas_model, tokenizer, input_ids, attention_mask)
            steps = f"{args.train_steps} step{'s' * (args.train_steps != 1)}"
            print(f"training loss {losses[0]:.4f} -> {after['nll']:.4f} nats/token over {steps}")
        if grpo:
            print(
                f"recall reward (token F1, held-out prompts) {rewards[0]:.3f} -> {rewards[1]:.3f} "
                f"over {args.train_steps} GRPO steps"
            )
        memory.metadata.update(train_steps=args.train_steps, lr=args.lr, loss=args.loss)
        if grpo:
            memory.metadata.update(grpo=dataclasses.asdict(grpo))
    if memory.non_finite():
        raise CommandError(f"training diverged (NaN or inf in the memory) at --lr {args.lr}; lower --lr")
    memory.save(out)
    print(f"wrote {out}")


def command_nll(args) -> None:
    from locas.data import read_text

    text = read_text(args.text_file)
    memory = _read_memory(args.memory) if args.memory else None
    model, tokenizer = _load(args)
    locas_model = _locas_model(model, memory)
    token_ids = _tokens(tokenizer, text, args.text_file, args.max_tokens)
    input_ids, attention_mask = _windows(model, tokenizer, token_ids, args.window)
    result = _score(locas_model, tokenizer, input_ids, attention_mask)
    source = f"memory {args.memory}" if args.memory else "no memory"
    print(
        f"{args.text_file}: {result['tokens']} tokens scored, {source}: NLL {result['nll']:.4f}  "
        f"perplexity {result['perplexity']:.3f}  bits/byte {result['bits_per_byte']:.4f}"
    )


def command_generate(args) -> None:
    import torch
    from transformers import TextStreamer

    from locas.model import positions

    if not args.prompt.strip():
        raise CommandError("the prompt is empty; pass some text to continue")
    memory = _read_memory(args.memory) if args.memory else None
    model, tokenizer = _load(args)
    locas_model = _locas_model(model, memory)
    prompt = args.prompt
    if args.chat:
        if not tokenizer.chat_template:
            raise CommandError("--chat needs a tokenizer with a chat template; this model's has none: drop --chat")
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    encoded = tokenizer(prompt, return_tensors="pt").to(locas_model.device)
    length = encoded.input_ids.shape[1] + args.max_new_tokens
    learned, trained = positions(model)
    if learned is not None and encoded.input_ids.shape[1] >= learned:
        raise CommandError(
            f"the prompt's {encoded.input_ids.shape[1]} tokens fill this model's {learned} positions: nothing can "
            "follow; use a shorter prompt"
        )
    if learned is not None and length > learned:
        raise CommandError(
            f"the prompt ({encoded.input_ids.shape[1]} tokens) + --max-new-tokens {args.max_new_tokens} exceed this "
            f"model's {learned} positions; use --max-new-tokens {learned - encoded.input_ids.shape[1]} or less"
        )
    if trained is not None and length > trained:
        warnings.warn(
            f"the prompt + --max-new-tokens {args.max_new_tokens} = {length} tokens run past the {trained} positions "
            "this model was trained on (max_position_embeddings)",
            stacklevel=2,
        )
    with torch.no_grad():  # the text is printed as it is generated
        locas_model.generate(
            input_ids=encoded.input_ids,
            attention_mask=encoded.attention_mask,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
        )


def command_export(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        kind = "is a non-empty folder" if out.is_dir() else "is a file"
        raise CommandError(f"--out {str(out)!r} already exists and {kind}; choose a new folder")
    _check_output_path(out)
    memory = _read_memory(args.memory)
    if args.index is None and memory.batch_size > 1:
        raise CommandError(
            f"{args.memory} holds {memory.batch_size} memories (one per document); pick one with --index 0.."
            f"{memory.batch_size - 1}"
        )
    if args.index is not None and not 0 <= args.index < memory.batch_size:
        raise CommandError(
            f"--index {args.index}: {args.memory} holds {memory.batch_size} "
            + (
                "memory; drop --index"
                if memory.batch_size == 1
                else f"memories; use --index 0..{memory.batch_size - 1}"
            )
        )
    from locas.merge import merge_error

    model, tokenizer = _load(args)
    locas_model = _locas_model(model, memory)
    memory = locas_model.memory if args.index is None else locas_model.memory.select(args.index)
    dense = locas_model.to_dense(memory)
    probe = tokenizer(
        "The memory is merged into the weights, and the model is served as usual.", return_tensors="pt"
    ).input_ids.to(locas_model.device)
    layer_error = merge_error(locas_model, dense, probe, memory)
    if not layer_error <= 1e-4:  # relative, in float32: ~1e-7 when exact
        raise CommandError(f"the merged MLPs differ from MLP + memory by {layer_error:.3g} of their output (> 1e-4)")
    with torch.no_grad():
        with locas_model.using(memory):
            expected = locas_model(input_ids=probe).logits.float()
        merged = dense(input_ids=probe).logits.float()

    from locas.data import with_default_permissions

    staging = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        dense.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=dense.dtype).to(locas_model.device).eval()
        with torch.no_grad():
            logits = reloaded(input_ids=probe).logits.float()
        if not (logits - merged).abs().max().item() <= 1e-4 * max(1.0, merged.abs().max().item()):
            raise CommandError(
                "the reloaded checkpoint's logits differ from those of the dense model it was saved from"
            )
        difference = (logits - expected).abs().max().item()
        # In half precision the memory model's two rounded outputs and the dense model's one wider product
        # round differently (by as much as an untrained memory moves the logits): merge_error is the proof there.
        if dense.dtype == torch.float32 and not difference <= 1e-4:
            raise CommandError(f"reloaded dense model differs from the memory model by {difference:.3g} (> 0.0001)")
        if out.exists():
            out.rmdir()
        with_default_permissions(staging).rename(out)  # mkdtemp's folder and safetensors' files are private
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    width_field = locas_model.family.width_field
    if dense.dtype == torch.float32:
        logits = f"reloaded logits match the memory model (max abs diff {difference:.2e})"
    else:
        half = str(dense.dtype).removeprefix("torch.")
        logits = f"reloaded logits differ from the memory model's by {difference:.2e} ({half} rounding)"
    print(
        f"exported {out}: {type(dense).__name__}, {width_field} {getattr(dense.config, width_field)}; each merged MLP "
        f"equals MLP + memory in float32 (largest relative difference {layer_error:.1e}); {logits}"
    )


def _online_config(args) -> OnlineConfig:
    """The trainer's settings from the options named after `OnlineConfig`'s fields (see `_trainer_options`)."""
    from locas.training.config import OnlineConfig

    config = OnlineConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(OnlineConfig) if hasattr(args, f.name)}
    )
    locas = dataclasses.replace(config, method="locas").resolved()
    _check_output_ratio(args, locas.tau_rule)
    default = OnlineConfig()
    changed = [
        "--" + f.name.replace("_", "-")
        for f in dataclasses.fields(OnlineConfig)
        if f.name.startswith("grpo_") and getattr(config, f.name) != getattr(default, f.name)
    ]
    if changed and not locas.uses_grpo:
        warnings.warn(
            f"{', '.join(changed)}: only --loss grpo and ntp+grpo read the GRPO options; this run's loss is "
            f"{locas.loss!r}, so they are ignored",
            stacklevel=2,
        )
    return config


def _check_output_ratio(args, tau_rule: str) -> None:
    """Refuse an --output-ratio that the tau rule in force would ignore."""
    if getattr(args, "output_ratio", None) is not None and tau_rule != "output":
        raise CommandError(
            f"--output-ratio sets the scale of --tau-rule output, but the tau rule here is {tau_rule!r}: "
            "add --tau-rule output or drop --output-ratio"
        )


def command_eval_pg19(args) -> None:
    from locas.evaluation import pg19
    from locas.evaluation.distributed import process_group

    out = Path(args.out)
    _check_output_path(out, ".json")
    methods = pg19.method_configs(args.methods, _online_config(args))
    if args.max_tokens is not None and args.max_tokens < args.chunk_size:
        raise CommandError(f"--max-tokens {args.max_tokens} is less than one chunk (--chunk-size {args.chunk_size})")
    pg19.check_book_files(args.books)
    settings = {"model": args.model or "default", "dtype": args.dtype, "max_tokens": args.max_tokens}
    with process_group(args.device) as (ranks, device):
        model, tokenizer = _load(args, device)
        settings["weights_dtype"] = _weights_dtype(model)
        books = [pg19.read_book(path, tokenizer, args.max_tokens, args.chunk_size) for path in args.books]
        results = pg19.evaluate(
            model,
            tokenizer,
            books,
            methods,
            out,
            settings,
            save_every=args.save_every,
            ranks=ranks,
            batch_books=args.batch_books,
        )
    if results is not None:
        print(pg19.format_table(results))
        print(f"wrote {out} and {pg19.plot_path(out)}")


def _select_conversations(
    conversations: list[Conversation], selectors: list[str] | None, path: str
) -> list[Conversation]:
    """The conversations named by 0-based indices or sample ids (all for None), in the given order."""
    if selectors is None:
        return conversations
    by_id = {c.sample_id: c for c in conversations}
    chosen = {}
    for selector in selectors:
        if selector.isdigit() and int(selector) < len(conversations):
            conversation = conversations[int(selector)]
        elif selector in by_id:
            conversation = by_id[selector]
        else:
            raise CommandError(
                f"--conversations {selector!r}: {path} has {len(conversations)} conversations, "
                f"indices 0-{len(conversations) - 1} or sample ids {', '.join(by_id)}"
            )
        if conversation.sample_id in chosen:
            raise CommandError(f"--conversations: conversation {conversation.sample_id} is given twice")
        chosen[conversation.sample_id] = conversation
    return list(chosen.values())


def command_eval_locomo(args) -> None:
    from locas.evaluation import locomo
    from locas.evaluation.distributed import process_group

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {str(out)!r} is a file; name a folder (created if missing)")
    _check_output_path(out)
    locomo.parse_conditions(args.methods)  # refuses unknown and repeated names
    names = locomo.with_context(args.methods) if args.with_context else args.methods
    training = _online_config(args)
    locomo.training_configs(locomo.parse_conditions(names), training)  # refuses bad trainer settings now
    conversations = _select_conversations(locomo.load_locomo(args.file), args.conversations, args.file)
    settings = locomo.QASettings(
        prompt_window=args.prompt_window,
        max_new_tokens=args.max_new_tokens,
        abstain_hint=args.abstain_hint,
        max_questions=args.max_questions,
        categories=None if args.categories is None else tuple(args.categories),
        answer_batch=args.answer_batch,
    )
    if not any(settings.questions(conversation) for conversation in conversations):
        raise CommandError("--categories selects no question of the chosen conversations")
    run_info = {
        "data": args.file,
        "context_mode": args.context_mode,
        "model": args.model or "default",
        "dtype": args.dtype,
    }
    with process_group(args.device) as (ranks, device):
        model, tokenizer = _load(args, device)
        run_info["weights_dtype"] = _weights_dtype(model)
        results = locomo.evaluate_locomo(
            model, tokenizer, conversations, names, training, settings, output_dir=out, run_info=run_info, ranks=ranks
        )
    if results is not None:
        print(locomo.format_table(results))
        print(f"wrote {out / 'results.json'} and {out / 'locomo.png'}")


def _add_mmlu_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shots", type=non_negative_int, default=5, help="solved dev examples before each question")
    parser.add_argument(
        "--subjects", type=comma_list(str), default=None, help="e.g. anatomy,virology (default: all, sorted)"
    )
    parser.add_argument("--limit-per-subject", type=positive_int, default=None, help="the first N questions of each")


def _read_adapter(path: str):
    """The --adapter, read before the model loads so that a wrong path fails fast: a peft adapter folder
    (returned as a Path) or an adapter file of `locas eval locomo` (adapters/ID.pt, returned as an OnlineResult)."""
    import pickle

    import torch

    from locas.training.config import saved_config
    from locas.training.online import OnlineResult

    source = Path(path)
    fix = "pass a peft adapter folder (save_pretrained) or an adapters/ID.pt file of 'locas eval locomo'"
    if source.is_dir():
        if not (source / "adapter_config.json").is_file():
            raise CommandError(f"--adapter {path!r} has no adapter_config.json; {fix}")
        return source
    try:
        saved = torch.load(source, weights_only=True, map_location="cpu")
        return OnlineResult(saved_config(saved["online_config"]), final_state=saved["final_state"])
    except (OSError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as error:
        raise CommandError(f"--adapter {path!r} cannot be read ({error}); {fix}") from error


def _scored_model(stack, model, memory: Memory | None, adapter):
    """The model with the memory or adapter on until `stack` closes (the bare model when neither is given)."""
    if memory is not None:
        locas_model = _locas_model(model, memory)
        stack.callback(locas_model.detach)
        return locas_model
    if adapter is None:
        return model
    try:
        if isinstance(adapter, Path):
            from peft import PeftModel

            return PeftModel.from_pretrained(model, adapter)
        from locas.training.online import trained

        stack.enter_context(trained(model, adapter))  # the adapter's layers sit inside `model`
        return model
    except (RuntimeError, KeyError) as error:
        raise CommandError(f"--adapter does not fit this model ({error}); pass one trained on it") from error


def command_eval_mmlu(args) -> None:
    from contextlib import ExitStack

    from locas.evaluation import mmlu
    from locas.evaluation.pg19 import write_json

    out = Path(args.out)
    _check_output_path(out, ".json")
    subjects = mmlu.load_mmlu(args.directory, args.subjects, args.limit_per_subject, args.shots)
    memory = _read_memory(args.memory) if args.memory else None
    adapter = _read_adapter(args.adapter) if args.adapter else None
    model, tokenizer = _load(args)
    with ExitStack() as stack:
        results = mmlu.score_mmlu(_scored_model(stack, model, memory, adapter), tokenizer, subjects)
    settings = {"model": args.model or "default", "dtype": args.dtype, "weights_dtype": _weights_dtype(model)}
    settings.update(memory=args.memory, adapter=args.adapter)
    write_json({"settings": {**settings, "directory": args.directory}, **results}, out)
    print(mmlu.format_table(results))
    print(f"wrote {out}")


def command_eval_forgetting(args) -> None:
    from locas.evaluation import forgetting, mmlu, pg19

    out = Path(args.out)
    _check_output_path(out, ".json")
    config = dataclasses.replace(_online_config(args), method=args.method).resolved()
    if args.max_tokens is not None and args.max_tokens < args.chunk_size:
        raise CommandError(f"--max-tokens {args.max_tokens} is less than one chunk (--chunk-size {args.chunk_size})")
    for probe in args.probes:
        if Path(probe).resolve() == Path(args.book).resolve():
            raise CommandError(f"--probe {probe!r} is the book itself; probe with texts the memory never saw")
    if args.mmlu is None and not args.no_mmlu:
        raise CommandError("no MMLU folder; pass --mmlu DIR, or --no-mmlu to measure the probe perplexity only")
    pg19.check_book_files([args.book, *args.probes])
    subjects = [] if args.no_mmlu else mmlu.load_mmlu(args.mmlu, args.subjects, args.limit_per_subject, args.shots)
    model, tokenizer = _load(args)
    book = pg19.read_book(args.book, tokenizer, args.max_tokens, config.chunk_size)
    probes = [pg19.read_book(path, tokenizer, args.probe_tokens) for path in args.probes]
    for probe in probes:
        if probe.token_ids.numel() < 2:
            raise CommandError(f"--probe {str(probe.path)!r} holds one token: nothing to predict; use a longer text")
    results = forgetting.evaluate_forgetting(
        model,
        tokenizer,
        book,
        config,
        subjects,
        probes,
        probe_window=args.probe_window,
        state_path=out.with_suffix(".state.pt"),
        save_every=args.save_every,
    )
    folder, shots = (None, None) if args.no_mmlu else (args.mmlu, args.shots)
    settings = {"model": args.model or "default", "dtype": args.dtype, "weights_dtype": _weights_dtype(model)}
    settings.update(mmlu=folder, shots=shots)
    settings.update(max_tokens=args.max_tokens, probe_tokens=args.probe_tokens, probe_window=args.probe_window)
    pg19.write_json({"settings": settings, **results}, out)
    print(forgetting.format_summary(results))
    print(f"wrote {out}")


# --- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from locas.config import MEMORY_INITS, TAU_RULES
    from locas.training.config import GRPO_LOSSES

    parser = ArgumentParser(prog="locas", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model_options = argparse.ArgumentParser(add_help=False)
    model_options.add_argument(
        "--model", default=None, help="local folder, .gguf file or hub id (default: the embedded SmolLM2-135M)"
    )
    model_options.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: the checkpoint's on a GPU, float32 on a CPU (half precision is far slower there)",
    )
    model_options.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: where it loads)")
    text_options = argparse.ArgumentParser(add_help=False)
    text_options.add_argument("text_file", help="UTF-8 text file")
    text_options.add_argument(
        "--max-tokens", type=at_least_two, default=4096, help="use the first N tokens (default: %(default)s)"
    )
    text_options.add_argument(
        "--window", type=at_least_two, default=1024, help="tokens per forward window (default: %(default)s)"
    )

    memorize = commands.add_parser(
        "memorize", parents=[model_options, text_options], help="memorize a text into a memory file"
    )
    memorize.add_argument("--out", required=True, help="memory file to write (.safetensors)")
    memorize.add_argument(
        "--width", type=positive_int, default=64, help="memory slots per layer (default: %(default)s)"
    )
    memorize.add_argument("--init", default="highest", choices=MEMORY_INITS, help="(default: %(default)s)")
    memorize.add_argument(
        "--tau-rule",
        default="output",
        choices=TAU_RULES,
        help="output scale of the slots: paper (mean backbone output norm / width), neuron (mean norm per slot) or "
        "output (--output-ratio x each layer's MLP output, measured on the text) (default: %(default)s, as the "
        "default preset of eval)",
    )
    memorize.add_argument(
        "--output-ratio",
        type=positive_float,
        help="--tau-rule output: the memory's full output as a fraction of each layer's median MLP output "
        "(default: 0.1)",
    )
    memorize.add_argument(
        "--train-steps",
        type=non_negative_int,
        default=MEMORIZE_TRAIN_STEPS,
        help="training steps of --loss after memorizing (ntp+grpo: N NTP steps, then N GRPO steps); 0 keeps the "
        "memory as memorized (values zero, the model unchanged, except with --init gradient) (default: %(default)s)",
    )
    memorize.add_argument(
        "--loss",
        default=None,
        choices=["ntp", *GRPO_LOSSES],
        help="what --train-steps trains: ntp (next-token loss on the text), grpo (recalling passages of the text, "
        "rewarded by token F1) or ntp+grpo (default: ntp)",
    )
    memorize.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help=f"--train-steps learning rate (default: {MEMORIZE_LR['ntp']} for ntp, {MEMORIZE_LR['grpo']} for the "
        "GRPO losses)",
    )
    memorize.add_argument("--seed", type=int, default=0, help="random inits and GRPO's prompts and samples")
    _add_grpo_options(memorize.add_argument_group("GRPO (--loss grpo, ntp+grpo)"), "each step")
    memorize.set_defaults(run=command_memorize)

    nll = commands.add_parser("nll", parents=[model_options, text_options], help="perplexity and bits per byte")
    nll.add_argument("--memory", default=None, help="memory file to attach")
    nll.set_defaults(run=command_nll)

    generate = commands.add_parser("generate", parents=[model_options], help="generate text, optionally with a memory")
    generate.add_argument("prompt", help="the text to continue")
    generate.add_argument("--memory", default=None, help="memory file to attach")
    generate.add_argument(
        "--max-new-tokens", type=positive_int, default=64, help="tokens to generate at most (default: %(default)s)"
    )
    generate.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    generate.set_defaults(run=command_generate)

    export = commands.add_parser(
        "export", parents=[model_options], help="merge a memory into the weights and save a vanilla checkpoint"
    )
    export.add_argument("--memory", required=True, help="memory file to merge")
    export.add_argument("--out", required=True, help="new folder for the checkpoint and tokenizer")
    export.add_argument("--index", type=int, default=None, help="which memory of a batched memory file to merge")
    export.set_defaults(run=command_export)

    evaluate = commands.add_parser("eval", help="benchmarks: online score-first evaluation of the methods")
    benchmarks = evaluate.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    trainer_options = _trainer_options()
    _add_eval_pg19(benchmarks, [model_options, trainer_options])
    _add_eval_locomo(benchmarks, [model_options, trainer_options])
    _add_eval_mmlu(benchmarks, [model_options])
    _add_eval_forgetting(benchmarks, [model_options, trainer_options])
    return parser


def _preset_default(option: str) -> str:
    """For --help: the default preset's value of `option`, per method that has it (e.g. 'locas 0.004, lora 5e-05')."""
    from locas.training.config import PRESETS

    values = [(method, values[option]) for method, values in PRESETS["default"].items() if option in values]
    shown = values[0][1] if len(values) == 1 else ", ".join(f"{method} {value}" for method, value in values)
    return f"default: the --preset's ({shown} in 'default')"


def _trainer_options() -> argparse.ArgumentParser:
    """The online trainer's options, named after `OnlineConfig`'s fields, shared by the benchmarks. The options a
    preset sets default to None: `OnlineConfig.resolved` fills them from --preset, so explicit flags win."""
    from locas.config import MEMORY_INITS, TAU_RULES
    from locas.training.config import COMPILE_MODES, PRESETS, TRAINING_LOSSES

    parser = argparse.ArgumentParser(add_help=False)
    options = parser.add_argument_group("online training (each method's memory or adapter)")
    options.add_argument(
        "--preset",
        default="default",
        choices=PRESETS,
        help="each method's hyperparameters for the options not given: paper (the paper's Locas, TempLoRA's "
        "published defaults) or default (from the PG-19 sweep on development books: TempLoRA's best point; Locas: "
        "the paper's settings with --tau-rule output --output-ratio 0.1, the one scale that does well on both "
        "embedded models)",
    )
    options.add_argument(
        "--chunk-size", type=at_least_two, default=1024, help="tokens scored, then trained on, at a time"
    )
    options.add_argument(
        "--context-window", type=non_negative_int, default=2048, help="previous tokens seen (>= chunk)"
    )
    options.add_argument(
        "--width", type=positive_int, help=f"locas: memory slots per layer; {_preset_default('width')}"
    )
    options.add_argument(
        "--init", dest="memory_init", choices=MEMORY_INITS, help=f"locas: init; {_preset_default('memory_init')}"
    )
    options.add_argument(
        "--tau-rule",
        choices=TAU_RULES,
        help="locas: output scale of a new memory's slots: paper (mean backbone output norm / width), neuron "
        "(mean norm per slot) or output (--output-ratio x the layer's MLP output, measured on the memorized text); "
        f"{_preset_default('tau_rule')}",
    )
    options.add_argument(
        "--output-ratio",
        type=positive_float,
        help="locas, --tau-rule output: the memory's full output as a fraction of each layer's median MLP output; "
        f"{_preset_default('output_ratio')}",
    )
    options.add_argument(
        "--top-layers",
        type=positive_fraction,
        help="locas: the fraction of the decoder layers, from the top, that run the memory (the backward pass "
        f"stops below them); {_preset_default('top_layers')}",
    )
    options.add_argument("--memorize-at", type=non_negative_int, default=0, help="locas: chunk memorized from")
    options.add_argument("--grow-by", type=non_negative_int, default=0, help="locas: slots added per later chunk")
    options.add_argument("--max-width", type=positive_int, default=None, help="locas: stop growing at this width")
    options.add_argument("--lr", type=positive_float, help=_preset_default("lr"))
    options.add_argument(
        "--key-lr-scale",
        type=non_negative_float,
        help=f"locas: the keys learn at lr x this (0: frozen keys); {_preset_default('key_lr_scale')}",
    )
    options.add_argument(
        "--steps-per-chunk",
        type=non_negative_int,
        help="steps of the token loss (ntp, sd, mix; ntp+grpo's NTP) per chunk (grpo: 0); "
        + _preset_default("steps_per_chunk"),
    )
    options.add_argument(
        "--loss",
        "--ttt-loss",
        default="ntp",
        choices=TRAINING_LOSSES,
        help="ntp, sd (self-distillation), mix, grpo (locas: GRPO on recalling passages of each chunk, rewarded "
        "by token F1) or ntp+grpo (each chunk's NTP steps, then GRPO)",
    )
    options.add_argument("--teacher-window", type=positive_int, default=None, help="sd/mix: default 4 x window")
    options.add_argument("--mix-alpha", type=fraction, default=0.5, help="mix: weight of the NTP loss")
    options.add_argument("--lora-rank", type=positive_int, help=f"lora: adapter rank; {_preset_default('lora_rank')}")
    options.add_argument(
        "--lora-alpha", type=positive_float, help=f"lora: adapter scale; {_preset_default('lora_alpha')}"
    )
    options.add_argument(
        "--lora-targets",
        help="lora: 'all' (attention and MLP projections) or some module names, comma-separated (e.g. "
        f"q_proj,v_proj); {_preset_default('lora_targets')}",
    )
    options.add_argument("--seed", type=int, default=0, help="locas random inits and GRPO samples, lora adapter init")
    options.add_argument(
        "--compile",
        default="off",
        choices=COMPILE_MODES,
        help="run the scored model through torch.compile in this mode (reduce-overhead: CUDA graphs); every chunk "
        "then has one shape, so one compilation serves the run (one per batch size and for the teacher). Costs "
        "minutes of compilation; does not pay on a CPU, not yet measured on a GPU (README, Speed)",
    )
    _add_grpo_options(parser.add_argument_group("GRPO of a locas memory (--loss grpo, ntp+grpo)"), "each chunk")
    return parser


def _add_grpo_options(group, batch: str) -> None:
    """The --grpo-* options (`OnlineConfig`'s grpo_ fields, with its defaults); `batch`: what one GRPO batch is of."""
    from locas.training.config import OnlineConfig

    default = OnlineConfig()
    group.add_argument(
        "--grpo-prompts-per-chunk",
        type=positive_int,
        default=default.grpo_prompts_per_chunk,
        help=f"grpo: recall prompts cut from the text for {batch} (default %(default)s)",
    )
    group.add_argument(
        "--grpo-prompt-tokens",
        type=positive_int,
        default=default.grpo_prompt_tokens,
        help="grpo: tokens per prompt (default %(default)s)",
    )
    group.add_argument(
        "--grpo-continuation-tokens",
        type=positive_int,
        default=default.grpo_continuation_tokens,
        help="grpo: tokens of the true continuation that a sample is scored against (default %(default)s)",
    )
    group.add_argument(
        "--grpo-group-size",
        type=group_size,
        default=default.grpo_group_size,
        help="grpo: continuations sampled per prompt (>= 2; default %(default)s)",
    )
    group.add_argument(
        "--grpo-max-new-tokens",
        type=positive_int,
        default=default.grpo_max_new_tokens,
        help="grpo: tokens sampled per continuation (default %(default)s)",
    )
    group.add_argument(
        "--grpo-temperature",
        type=positive_float,
        default=default.grpo_temperature,
        help="grpo: sampling temperature (default %(default)s)",
    )
    group.add_argument(
        "--grpo-clip-epsilon",
        type=clip_range,
        default=default.grpo_clip_epsilon,
        help="grpo: PPO clip of the probability ratio, in [0, 1) (default %(default)s)",
    )
    group.add_argument(
        "--grpo-beta",
        type=non_negative_float,
        default=default.grpo_beta,
        help="grpo: weight of the KL to the model without memory (default %(default)s)",
    )
    group.add_argument(
        "--grpo-updates-per-batch",
        type=positive_int,
        default=default.grpo_updates_per_batch,
        help="grpo: optimiser steps on each sampled batch (default %(default)s)",
    )


PG19_DESCRIPTION = """\
PG-19 whole-book language modelling, online and score-first: each method streams each book in chunks,
scores every chunk before training on it, and never scores it again. Writes per-book and aggregate
perplexities (at 50K..200K tokens and every 10%), bits per byte, TempLoRA's perplexity convention, time,
parameters and peak memory to --out (.json), and a plot of perplexity against tokens read beside it (.png).

State is saved in OUT.state/ beside --out: a run started again with the same command resumes each unfinished
(book, method) pair and skips finished ones. Under `torchrun --nproc_per_node N -m locas eval pg19 ...` the
books are shared among the processes (book i -> rank i % N) and rank 0 writes the results."""


def _add_eval_pg19(benchmarks, parents: list[argparse.ArgumentParser]) -> None:
    pg19 = benchmarks.add_parser(
        "pg19",
        parents=parents,
        help="PG-19 whole-book perplexity",
        description=PG19_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pg19.add_argument("books", nargs="+", metavar="BOOK", help="UTF-8 text files; a book's name is its file stem")
    pg19.add_argument(
        "--method",
        dest="methods",
        action="append",
        required=True,
        metavar="METHOD",
        help="repeat for several: none (the backbone, same window), long (the backbone, --long-factor x window), "
        "lora (TempLoRA), locas, or locas:INIT for a memory with that --init (e.g. --method locas:highest "
        "--method locas:random_index); the name labels the method in the results",
    )
    pg19.add_argument("--out", required=True, help="results file (.json) in an existing folder")
    pg19.add_argument("--max-tokens", type=at_least_two, default=None, help="read the first N tokens (default: all)")
    pg19.add_argument("--long-factor", type=positive_int, default=4, help="window multiple of the long method")
    pg19.add_argument("--save-every", type=positive_int, default=8, help="save the state every N chunks")
    pg19.add_argument(
        "--batch-books",
        type=positive_int,
        default=1,
        help="adapt N books at once, each with its own memory (same numbers, faster on a GPU; lora: always 1)",
    )
    pg19.set_defaults(
        run=command_eval_pg19,
        command="eval pg19",
        interrupted=lambda args: _kept(
            [Path(args.out).with_suffix(".state")],
            f"the state so far is in {Path(args.out).with_suffix('.state')}/ (saved every --save-every chunks); "
            "run the same command to resume",
        ),
    )


LOCOMO_DESCRIPTION = """\
LoCoMo long-dialogue QA (the paper's protocol): each conversation is rendered session by session in date
order (--context-mode date_split) and its questions are answered greedily under each --method condition:

  none        the question alone (the "No Cxt" floor)       full        the dialogue in the prompt
  locas       a Locas memory trained on the dialogue         locas+full  the memory and the dialogue
  lora        a TempLoRA adapter trained on the dialogue     lora+full   the adapter and the dialogue

--with-context adds each given condition's with-dialogue twin (none -> full, locas -> locas+full,
lora -> lora+full: the paper's "Full Attn + Locas" rows). A dialogue in the prompt is cut from the left
to fit --prompt-window. Each memory (adapter) is trained online, score-first, over the dialogue's tokens,
once per conversation, and kept in OUT/memories/ (OUT/adapters/): a later run with the same settings
reuses it. Scores are the official token F1 per category (category 5 both as the paper's -F1 and by the
official 'not mentioned' rule); OUT/results.json holds them with every prediction, OUT/locomo.png charts
them. Under `torchrun --nproc_per_node N -m locas eval locomo ...` conversation i goes to rank i % N and
rank 0 writes the results."""


def _add_eval_locomo(benchmarks, parents: list[argparse.ArgumentParser]) -> None:
    from locas.evaluation.config import CONDITIONS

    locomo = benchmarks.add_parser(
        "locomo",
        parents=parents,
        help="LoCoMo long-dialogue question answering",
        description=LOCOMO_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    locomo.add_argument("file", metavar="FILE", help="the LoCoMo data, locomo10.json")
    locomo.add_argument(
        "--method",
        dest="methods",
        action="append",
        required=True,
        metavar="CONDITION",
        help=f"repeat for several: {', '.join(CONDITIONS)}",
    )
    locomo.add_argument(
        "--with-context", action="store_true", help="also run each condition with the dialogue in the prompt"
    )
    locomo.add_argument("--out", required=True, help="output folder (created in an existing folder)")
    locomo.add_argument(
        "--conversations",
        type=comma_list(str),
        default=None,
        help="e.g. 0,3 (0-based indices into the file) or conv-26,conv-30 (default: all)",
    )
    locomo.add_argument("--categories", type=comma_list(category), default=None, help="e.g. 1,2 (default: all)")
    locomo.add_argument("--max-questions", type=positive_int, default=None, help="the first N per conversation")
    locomo.add_argument("--context-mode", default="date_split", choices=["date_split"], help="dialogue rendering")
    locomo.add_argument("--max-new-tokens", type=positive_int, default=32, help="answer length limit")
    locomo.add_argument(
        "--answer-batch", type=positive_int, default=8, help="questions decoded together (same answers)"
    )
    locomo.add_argument(
        "--prompt-window", type=positive_int, default=None, help="tokens of prompt + answer (default: the model's)"
    )
    locomo.add_argument("--abstain-hint", action="store_true", help="tell every question how to answer 'not mentioned'")
    locomo.set_defaults(
        run=command_eval_locomo,
        command="eval locomo",
        interrupted=lambda args: _kept(
            [Path(args.out) / "memories", Path(args.out) / "adapters"],
            f"the memories and adapters of the conversations finished so far are in "
            f"{Path(args.out) / 'memories'} and {Path(args.out) / 'adapters'}; run the same command to reuse them",
        ),
    )


MMLU_DESCRIPTION = """\
MMLU multiple choice (Hendrycks et al.), k-shot: each question follows its subject's header line and first
--shots solved dev examples, and the answer is the letter (" A".." D") the model finds most likely after
"Answer:" (one forward pass per question). A prompt longer than the model's window drops the last examples,
as few as needed. Writes accuracy per subject, the macro (mean over subjects) and micro (all questions)
averages and every question's prediction to --out (.json). --memory or --adapter scores the model with a
memory file or a LoRA adapter on."""


def _add_eval_mmlu(benchmarks, parents: list[argparse.ArgumentParser]) -> None:
    mmlu = benchmarks.add_parser(
        "mmlu",
        parents=parents,
        help="MMLU multiple-choice accuracy, optionally with a memory or adapter",
        description=MMLU_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mmlu.add_argument("directory", metavar="DIR", help="MMLU folder: test/SUBJECT_test.csv, dev/SUBJECT_dev.csv")
    learned = mmlu.add_mutually_exclusive_group()
    learned.add_argument("--memory", default=None, help="memory file to attach (locas memorize, eval locomo)")
    learned.add_argument(
        "--adapter", default=None, help="peft LoRA adapter folder, or an adapters/ID.pt file of eval locomo"
    )
    _add_mmlu_options(mmlu)
    mmlu.add_argument("--out", required=True, help="results file (.json) in an existing folder")
    mmlu.set_defaults(run=command_eval_mmlu, command="eval mmlu")


FORGETTING_DESCRIPTION = """\
Forgetting (the paper's MMLU forgetting protocol): train a Locas memory (--method locas) or a TempLoRA adapter
(--method lora) online over BOOK with the trainer options below, then measure MMLU accuracy (as `eval mmlu`)
and the perplexity of --probe texts the memory never saw (each one's first --probe-tokens tokens, in
windows of --probe-window tokens scored on their own), with the memory and without it; --no-mmlu measures
the probe perplexity only (a quick check, no MMLU folder needed). Writes both measurements and the changes
with a 95% paired-bootstrap interval (over questions, over probe windows) to --out (.json). The training
is saved in OUT.state.pt: the same command run again resumes it, or reuses it once finished (delete the
file to train again)."""


def _add_eval_forgetting(benchmarks, parents: list[argparse.ArgumentParser]) -> None:
    forgetting = benchmarks.add_parser(
        "forgetting",
        parents=parents,
        help="MMLU (optional) and held-out perplexity before and after memorising a book",
        description=FORGETTING_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    forgetting.add_argument("book", metavar="BOOK", help="UTF-8 text the memory or adapter is trained on")
    forgetting.add_argument("--method", required=True, choices=["locas", "lora"], help="what is trained on BOOK")
    forgetting.add_argument("--mmlu", default=None, metavar="DIR", help="MMLU folder (see eval mmlu)")
    forgetting.add_argument(
        "--no-mmlu", action="store_true", help="measure the probe perplexity only (--mmlu and its options unread)"
    )
    forgetting.add_argument(
        "--probe",
        dest="probes",
        nargs="+",
        action="extend",
        required=True,
        metavar="TEXT",
        help="held-out UTF-8 texts (repeat --probe or list several)",
    )
    forgetting.add_argument("--probe-tokens", type=at_least_two, default=4096, help="first N tokens of each probe")
    forgetting.add_argument("--probe-window", type=at_least_two, default=1024, help="tokens per scored window")
    forgetting.add_argument("--max-tokens", type=at_least_two, default=None, help="train on the book's first N tokens")
    _add_mmlu_options(forgetting)
    forgetting.add_argument("--save-every", type=positive_int, default=8, help="save the training every N chunks")
    forgetting.add_argument("--out", required=True, help="results file (.json) in an existing folder")
    forgetting.set_defaults(
        run=command_eval_forgetting,
        command="eval forgetting",
        interrupted=lambda args: _kept(
            [Path(args.out).with_suffix(".state.pt")],
            f"the training so far is saved in {Path(args.out).with_suffix('.state.pt')} "
            "(every --save-every chunks); run the same command to resume",
        ),
    )


def _kept(paths: list[Path], message: str) -> str:
    """What an interrupted command kept: `message` where one of `paths` holds saved work, else that nothing did."""
    if any(path.is_file() or (path.is_dir() and any(path.iterdir())) for path in paths):
        return message
    return "nothing was saved yet; run the same command to start again"


def _trainer_flags(message: str) -> str:
    """A trainer message with `OnlineConfig`'s field names (and the benchmarks' prompt_window, max_tokens) as the
    eval commands' flags (chunk_size -> --chunk-size, memory_init -> --init), so that it names what to change on
    the command line."""
    from locas.training.config import OnlineConfig

    # only where a value, a rule or an alternative follows: "lr 0.01", "lr must", "lower memorize_at or chunk_size"
    names = [field.name for field in dataclasses.fields(OnlineConfig)] + ["prompt_window", "max_tokens"]
    for name in names:
        flag = "--init" if name == "memory_init" else "--" + name.replace("_", "-")
        value = r"(?=\s+(?:[\d'\"\-]|must\b|is\b|or\b|>=)|=|$)"
        message = re.sub(rf"(?<![\w\-/.']){name}{value}", flag, message)
    return message


@contextmanager
def _quiet_transformers():
    """No transformers progress bars (loading, saving) while a command runs: stderr is for our messages."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line; `--help` and usage errors exit here, before torch is imported."""
    args, unrecognized = build_parser().parse_known_args(argv)
    if unrecognized and hasattr(args, "books") and not any(text.startswith("-") for text in unrecognized):
        args.books += unrecognized  # `eval pg19 A.txt --method none B.txt`: argparse reads positionals in one run
    elif unrecognized:
        usage_error(f"locas {args.command}", f"unrecognized arguments: {' '.join(unrecognized)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    try:
        from locas.default_model import ModelLoadError
    except KeyboardInterrupt:
        print(f"locas {args.command}: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    try:
        _run_command(args)
    except (CommandError, ModelLoadError, OSError, ValueError, IndexError) as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        if (hasattr(args, "chunk_size") or args.command == "memorize") and not isinstance(error, CommandError):
            message = _trainer_flags(message)
        if hasattr(args, "width"):
            message = message.replace("width (keep_top)", "--width")  # memorize's Python name for it
        print(f"locas {args.command}: error: {message or type(error).__name__}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        kept = args.interrupted(args) if hasattr(args, "interrupted") else "nothing was written"
        print(f"locas {args.command}: interrupted; {kept}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _run_command(args) -> None:
    from locas.allocator import keep_freed_memory_unless_disabled

    device = _checked_device(args)
    keep_freed_memory_unless_disabled(on_cpu=device is None or device.type == "cpu")  # (locas.allocator)
    with _quiet_transformers(), warnings.catch_warnings():
        warnings.showwarning = lambda message, *_, **__: print(
            f"locas {args.command}: warning: {' '.join(str(message).split())}", file=sys.stderr
        )
        args.run(args)


if __name__ == "__main__":
    sys.exit(main())
