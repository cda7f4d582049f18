"""Tiny local model folders (random weights + a small byte-level BPE tokenizer) for the CLI tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A memory is a small side network added to every layer of the model.",
    "Locas clones the most active neurons and trains only the memory.",
    "The merged model is served as usual, with wider feed-forward layers.",
    "Perplexity and bits per byte measure how well the model predicts a text.",
]
TEXT = " ".join(SENTENCES * 3) + "\n"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (every byte is a token, so any text encodes) with an eos token and no pad token."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(SENTENCES, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def save_tiny_model(
    folder: Path, tokenizer: PreTrainedTokenizerFast, hidden_size: int, seed: int, intermediate_size: int = 48
) -> Path:
    """A random 2-layer Llama of the given widths, saved with the tokenizer as a from_pretrained folder."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random init leaves norms at exactly 1: perturb so every weight is "real"
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
