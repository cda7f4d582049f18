import pytest
import torch
from cli_fixtures import TEXT, tiny_tokenizer
from conftest import shared_data, tiny_model
from tokenizers import processors

from locas.data import first_tokens, split_windows, window_prefix
from locas.training.config import OnlineConfig
from locas.training.online import run_online


def bos_tokenizer():
    """The tiny tokenizer, told to put <eos> (standing in for a bos token) before every text, as Gemma's does."""
    tokenizer = tiny_tokenizer()
    bos = tokenizer.eos_token_id
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<eos> $A", special_tokens=[("<eos>", bos)]
    )
    tokenizer.bos_token = "<eos>"
    return tokenizer, bos


class CountingTokenizer:
    """A tokenizer that records the length of every text it is asked to tokenise."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, text: str, **kwargs):
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)


def whole(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False).input_ids


@pytest.fixture(scope="module")
def books(embedded: dict) -> list[tuple[str, list[int]]]:
    """Three PG-19 books and their whole-text tokens (embedded tokenizer)."""
    texts = [shared_data("pg19", name).read_text(encoding="utf-8") for name in ("349.txt", "1684.txt", "2118.txt")]
    return [(text, whole(embedded["tokenizer"], text)) for text in texts]


@pytest.mark.embedded
@pytest.mark.parametrize("max_tokens", [0, 1, 7, 100, 1024, 5000, 60_000, 10**7])
def test_first_tokens_are_the_first_tokens_of_the_whole_book(embedded: dict, books, max_tokens: int):
    for text, token_ids in books:
        tokenizer = CountingTokenizer(embedded["tokenizer"])
        assert first_tokens(tokenizer, text, max_tokens) == token_ids[:max_tokens]
        if 24 * max(max_tokens, 8) < len(text):
            assert sum(tokenizer.lengths) <= 24 * max(max_tokens, 8)  # a prefix, not the whole book


@pytest.mark.embedded
def test_first_tokens_never_keeps_a_piece_of_a_cut_word(embedded: dict, books):
    """Each word is one token: cut after some characters, it gives several, the first of which is no token of
    the whole text."""
    tokenizer = embedded["tokenizer"]
    text = "".join([" characteristics", " representatives", " notwithstanding"] * 50)
    token_ids = whole(tokenizer, text)
    assert len(token_ids) == 150
    for max_tokens in range(152):
        assert first_tokens(tokenizer, text, max_tokens) == token_ids[:max_tokens], max_tokens
    text, token_ids = books[0]
    for max_tokens in range(300):
        assert first_tokens(tokenizer, text, max_tokens) == token_ids[:max_tokens], max_tokens


def test_first_tokens_with_long_words_and_no_spaces():
    tokenizer = tiny_tokenizer()
    text = TEXT.replace("memory", "memory" * 40).replace("served", "  \n\t served") * 4
    token_ids = whole(tokenizer, text)
    for max_tokens in range(len(token_ids) + 2):
        assert first_tokens(tokenizer, text, max_tokens) == token_ids[:max_tokens], max_tokens
    assert first_tokens(tokenizer, text, None) == token_ids
    no_spaces = text.replace(" ", "_")  # no word boundary to cut at: the whole text is tokenised
    assert first_tokens(tokenizer, no_spaces, 10) == whole(tokenizer, no_spaces)[:10]
    with pytest.raises(ValueError, match="max_tokens must be None or at least 0, got -1"):
        first_tokens(tokenizer, text, -1)


def test_window_prefix_is_bos_only_for_tokenizers_that_add_it_themselves():
    tokenizer, bos = bos_tokenizer()
    assert tokenizer("a").input_ids[0] == bos and window_prefix(tokenizer) == [bos]
    plain = tiny_tokenizer()
    plain.bos_token = "<eos>"  # a bos token it does not add (SmolLM2's case): no prefix
    assert window_prefix(plain) == [] and window_prefix(tiny_tokenizer()) == []


def test_split_windows_puts_the_prefix_before_every_window():
    input_ids, attention_mask = split_windows(torch.arange(10, 20), window=4, pad_id=0, prefix=[7])
    assert input_ids.tolist() == [[7, 10, 11, 12, 13], [7, 14, 15, 16, 17], [7, 18, 19, 0, 0]]
    assert attention_mask.tolist() == [[1] * 5, [1] * 5, [1, 1, 1, 0, 0]]


def test_a_window_longer_than_the_text_makes_rows_as_wide_as_the_text():
    """(was: rows of the window's width, so `locas nll short.txt --window 999999` allocated ~1 TB)"""
    input_ids, attention_mask = split_windows(torch.arange(10, 16), window=999_999, prefix=[7])
    assert input_ids.tolist() == [[7, 10, 11, 12, 13, 14, 15]] and attention_mask.tolist() == [[1] * 7]


def test_the_online_trainer_starts_every_window_with_the_prefix(one_thread):
    tokenizer, bos = bos_tokenizer()
    model = tiny_model("gemma3")
    seen, memorized = [], []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True)
    model.model.register_forward_pre_hook(  # memorize runs the base model alone, on the first chunk
        lambda module, args, kwargs: memorized.append(kwargs["input_ids"]), with_kwargs=True
    )
    tokens = torch.randint(3, 128, (48,), generator=torch.Generator().manual_seed(0))
    config = OnlineConfig(method="locas", chunk_size=16, context_window=16, width=4, lr=1e-2)
    with_bos = run_online(model, tokens, config, progress=False, tokenizer=tokenizer)
    assert torch.equal(memorized[0][0], torch.cat([torch.tensor([bos]), tokens[:16]]))
    assert with_bos.memory.metadata["tokens_memorized"] == 16  # the prefix is run, not scored
    windows = [ids for ids in seen if ids.shape[1] > 16]  # the scored/trained windows
    assert len(windows) == 3 and all((ids[:, 0] == bos).all() for ids in windows)
    assert torch.equal(windows[-1][0, 1:], tokens[16:48])  # then the context and the chunk, unchanged
    seen.clear()
    without = run_online(model, tokens, config, progress=False)
    assert all((ids[:, 0] != bos).all() for ids in seen)
    assert [r.targets for r in without.records] == [r.targets for r in with_bos.records]  # bos is never scored
    assert [r.nll_sum for r in without.records] != [r.nll_sum for r in with_bos.records]


def test_probe_windows_and_grpo_prompts_start_with_the_prefix_too(one_thread):
    from locas.evaluation.forgetting import probe_perplexity
    from locas.evaluation.pg19 import Book
    from locas.training.config import GrpoSettings
    from locas.training.grpo import _recall_batch

    tokenizer, bos = bos_tokenizer()
    tokens = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(0))
    probe = Book(name="p", path="p.txt", token_ids=tokens)
    model = tiny_model("llama")
    plain = probe_perplexity(model, [probe], window=16, progress=False)
    prefixed = probe_perplexity(model, [probe], window=16, prefix=[bos], progress=False)
    assert prefixed["tokens"] == plain["tokens"] == 15 + 15 + 7  # the prefix and each window's first token unscored
    assert prefixed["nll_sum"] != plain["nll_sum"]
    settings = GrpoSettings(prompt_tokens=6, continuation_tokens=4, prompts_per_chunk=2)
    prompts, continuations, _ = _recall_batch(tokens, settings, 0, tokenizer)
    assert prompts.shape == (2, 7) and (prompts[:, 0] == bos).all()
    plain_prompts, _, _ = _recall_batch(tokens, settings, 0, tiny_tokenizer())
    assert torch.equal(prompts[:, 1:], plain_prompts)


def test_a_saved_run_is_not_resumed_with_another_window_prefix(tmp_path, one_thread):
    tokenizer, _ = bos_tokenizer()
    tokens = torch.randint(3, 128, (48,), generator=torch.Generator().manual_seed(0))
    config = OnlineConfig(method="none", chunk_size=16, context_window=16)
    state = tmp_path / "state.pt"
    run_online(tiny_model("llama"), tokens, config, state_path=state, progress=False)
    with pytest.raises(ValueError, match=r"started its windows with \[\], this one with \[0\]"):
        run_online(tiny_model("llama"), tokens, config, state_path=state, progress=False, tokenizer=tokenizer)


class EndMergingTokenizer:
    """One token per character, except that the last 3 of any input come out as -1: a tokenizer whose pieces
    near the end of its input depend on where the input was cut."""

    def __call__(self, text: str, **kwargs):
        class Encoding:
            input_ids = [ord(c) for c in text[:-3]] + [-1] * min(3, len(text))

        return Encoding()


def test_first_tokens_trusts_a_prefix_only_when_a_longer_cut_agrees():
    # The first cut (after the 11 w's) gives 11 tokens, the last of the 10 kept already changed by the cut; the
    # next doubling finds no later space, so the same cut again must not count as agreement.
    text = "w" * 11 + " " + "x" * 300 + " y"
    tokenizer = EndMergingTokenizer()
    assert first_tokens(tokenizer, text, 10) == tokenizer(text).input_ids[:10] == [ord("w")] * 10
