import math

import pytest
import torch
from cli_fixtures import save_tiny_model, tiny_tokenizer
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from locas.model import attach
from locas.training import grpo
from locas.training.config import GrpoSettings
from locas.training.grpo import (
    _completion_log_probs,
    _left_padded,
    clipped_policy_loss,
    group_advantages,
    grpo_loss,
    grpo_step,
    grpo_train_chunk,
    kl_to_reference,
    recall_prompts,
    recall_reward,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = torch.randint(0, 128, (4, 6), generator=torch.Generator().manual_seed(0))


def low_token_fraction(completion_ids, answer, max_new_tokens=8):
    """A trivially learnable reward: the share of the sampled tokens that lie in the first quarter of the vocab."""
    return (completion_ids < 32).sum().item() / max_new_tokens


def memory_model(seed=0, width=16, logit_scale=1.0):
    """A tiny llama with a zero-valued memory; `logit_scale` sharpens its near-uniform random predictions."""
    model = tiny_model("llama", seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return attach(model, width=width)


# --- the math, against numbers worked out by hand --------------------------------------------------


def test_group_advantages_use_the_bessel_corrected_std_of_each_group():
    advantages = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]]), eps=1e-4)
    # group 1: mean 0.5, std = sqrt((4 * 0.5**2) / 3) = 0.5773502692; group 2: std 0, so 0 / eps = 0
    a = 0.5 / (0.5773502692 + 1e-4)  # 0.8658
    assert advantages.flatten().tolist() == pytest.approx([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0], abs=1e-6)


def test_clipped_policy_loss_clips_the_ratio_and_averages_per_sequence_then_over_sequences():
    old = torch.zeros(2, 2)
    logp = torch.tensor([[math.log(1.5), math.log(0.5)], [math.log(1.5), math.log(0.5)]])  # ratios 1.5 and 0.5
    mask = torch.tensor([[1, 1], [1, 0]])
    loss = clipped_policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask, clip_epsilon=0.2)
    # A = +1: -min(1.5, 1.2) = -1.2 and -min(0.5, 0.8) = -0.5, sequence mean -0.85
    # A = -1: -min(-1.5, -1.2) = 1.5 (the second token is masked), sequence mean 1.5
    assert loss.item() == pytest.approx((-0.85 + 1.5) / 2)  # 0.325; a token-level mean would give -0.0667
    # ratio 1 (the first update of a batch): the loss is minus the mean advantage
    assert clipped_policy_loss(old, old, torch.tensor([1.0, -3.0]), mask, 0.2).item() == pytest.approx(1.0)


def test_kl_to_reference_is_the_k3_estimator():
    mask = torch.ones(1, 2)
    same = torch.log(torch.tensor([[0.5, 0.25]]))
    assert kl_to_reference(same, same, mask).item() == 0.0
    # logp = log 0.5, ref = log 0.25: exp(-ln 2) + ln 2 - 1 = 0.1931472; swapped: 2 - ln 2 - 1 = 0.3068528
    logp, ref = torch.log(torch.tensor([[0.5, 0.25]])), torch.log(torch.tensor([[0.25, 0.5]]))
    assert kl_to_reference(logp, ref, mask).item() == pytest.approx((0.1931472 + 0.3068528) / 2)
    assert kl_to_reference(logp, ref, torch.tensor([[1, 0]])).item() == pytest.approx(0.1931472)


def test_grpo_loss_adds_beta_times_the_kl():
    logp, old, ref = torch.log(torch.tensor([[0.5, 0.4]])), torch.log(torch.tensor([[0.4, 0.4]])), torch.zeros(1, 2)
    mask, advantages = torch.ones(1, 2), torch.tensor([2.0])
    loss, kl = grpo_loss(logp, old, ref, advantages, mask, clip_epsilon=0.2, beta=0.1)
    assert kl.item() == pytest.approx(kl_to_reference(logp, ref, mask).item())
    # ratios 1.25 (clipped to 1.2) and 1: -(2 * 1.2 + 2 * 1) / 2 = -2.2
    assert loss.item() == pytest.approx(-2.2 + 0.1 * kl.item())


def test_settings_reject_a_group_of_one():
    with pytest.raises(ValueError, match="group_size"):
        GrpoSettings(group_size=1)


# --- GRPO steps on a tiny model --------------------------------------------------------------------


def test_kl_is_exactly_zero_with_a_zero_valued_memory_and_positive_with_values():
    settings = GrpoSettings(group_size=4, max_new_tokens=6, beta=0.0, updates_per_batch=3)
    locas_model = memory_model()
    optimizer = torch.optim.Adam(locas_model.memory.parameters(), lr=1e-2)
    steps = []
    result = grpo_step(
        locas_model, optimizer, PROMPTS, low_token_fraction, settings, after_step=lambda: steps.append(1)
    )
    assert result["kl"] == 0.0  # policy == reference bit for bit (the first update's KL, before any change)
    assert abs(result["loss"]) < 1e-6  # ratio 1 and beta 0: minus the mean of group-centred advantages
    assert len(steps) == 3 and locas_model.memory.down.abs().sum() > 0

    with torch.no_grad():
        locas_model.memory.down.normal_(generator=torch.Generator().manual_seed(0))
    assert grpo_step(locas_model, optimizer, PROMPTS, low_token_fraction, settings)["kl"] > 1e-6


def test_grpo_steps_raise_a_learnable_reward_and_train_only_the_memory():
    settings = GrpoSettings(group_size=8, max_new_tokens=8, beta=0.04, seed=0)
    locas_model = memory_model(logit_scale=10.0)
    backbone = {name: tensor.clone() for name, tensor in locas_model.model.state_dict().items()}
    down_before = locas_model.memory.down.detach().clone()
    optimizer = torch.optim.Adam(locas_model.memory.parameters(), lr=0.1)
    clips = []

    def clip():
        clips.append(1)
        locas_model.memory.clip_()

    rewards = [
        grpo_step(locas_model, optimizer, PROMPTS, low_token_fraction, settings, after_step=clip, seed=step)["reward"]
        for step in range(10)
    ]
    assert len(clips) == 10
    assert rewards[0] < 0.35  # about a quarter of the vocab at first (0.24)
    assert sum(rewards[-2:]) / 2 > rewards[0] + 0.35, rewards  # 0.79 at the end
    assert not torch.equal(locas_model.memory.down.detach(), down_before)
    assert all(torch.equal(tensor, backbone[name]) for name, tensor in locas_model.model.state_dict().items())


def test_sampling_is_seeded_and_leaves_the_callers_random_state_alone():
    def run(seed):
        locas_model = memory_model()
        optimizer = torch.optim.Adam(locas_model.memory.parameters(), lr=0.1)
        result = grpo_step(locas_model, optimizer, PROMPTS, low_token_fraction, GrpoSettings(seed=seed))
        return result, locas_model.memory.down.detach()

    torch.manual_seed(123)
    first, first_down = run(seed=5)
    after = torch.rand(1)
    torch.manual_seed(123)
    again, again_down = run(seed=5)
    assert torch.equal(torch.rand(1), after)
    assert first == again and torch.equal(first_down, again_down)
    assert not torch.equal(run(seed=6)[1], first_down)


def test_completion_log_probs_are_the_tempered_log_softmax_at_the_completion_tokens():
    locas_model = memory_model()
    ids = torch.tensor([[5, 9, 3, 7, 8, 9]])
    with torch.no_grad():
        log_probs = _completion_log_probs(locas_model, ids, torch.ones_like(ids), 3, temperature=0.7)
        logits = locas_model(input_ids=ids).logits[:, -4:-1]
    expected = torch.log_softmax(logits.float() / 0.7, dim=-1).gather(-1, ids[:, -3:, None]).squeeze(-1)
    torch.testing.assert_close(log_probs, expected)


def test_left_padded_prompts_get_the_log_probs_they_get_alone():
    locas_model = memory_model()
    with torch.no_grad():
        locas_model.memory.down.normal_(generator=torch.Generator().manual_seed(0))
    short, long = torch.tensor([5, 9, 3]), torch.tensor([1, 2, 3, 4, 5, 6])
    completion = torch.tensor([[7, 8, 9, 10], [11, 12, 13, 14]])
    prompts, mask = _left_padded([short, long])
    assert mask.tolist() == [[0, 0, 0, 1, 1, 1], [1] * 6]
    ids, full_mask = torch.cat([prompts, completion], dim=1), torch.cat([mask, torch.ones_like(completion)], dim=1)
    with torch.no_grad():
        batched = _completion_log_probs(locas_model, ids, full_mask, 4, temperature=0.7)
        alone = _completion_log_probs(
            locas_model, torch.cat([short, completion[0]]).unsqueeze(0), torch.ones(1, 7, dtype=torch.long), 4, 0.7
        )
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-5, atol=1e-5)


# --- the recall task -------------------------------------------------------------------------------


def test_recall_prompts_cut_a_prompt_and_the_tokens_that_follow_it():
    stream = torch.arange(100, 150)
    pairs = recall_prompts(stream, prompt_tokens=5, continuation_tokens=3, count=4, seed=0)
    starts = [int(prompt[0]) - 100 for prompt, _ in pairs]
    assert len(pairs) == 4 and starts == sorted(set(starts))
    for (prompt, continuation), start in zip(pairs, starts, strict=True):
        assert prompt.tolist() == list(range(100 + start, 105 + start))
        assert continuation.tolist() == list(range(105 + start, 108 + start))
    other_starts = [int(prompt[0]) - 100 for prompt, _ in recall_prompts(stream, 5, 3, 4, seed=1)]
    assert other_starts != starts  # the seed picks the starts
    assert recall_prompts(stream[:7], 5, 3, 4) == []  # too short for one pair
    every_start = recall_prompts(stream[:9], 5, 3, count=4)  # only 2 starts fit: both are given
    assert [prompt.tolist() for prompt, _ in every_start] == [[100, 101, 102, 103, 104], [101, 102, 103, 104, 105]]


def test_recall_reward_is_the_token_f1_of_the_decoded_texts():
    tokenizer = tiny_tokenizer()
    reward = recall_reward(tokenizer)
    truth = torch.tensor(tokenizer.encode(" quick brown fox jumps"))
    assert reward(truth, truth) == 1.0
    assert reward(torch.tensor(tokenizer.encode(" memory layer model")), truth) == 0.0
    assert reward(torch.tensor(tokenizer.encode(" quick brown")), truth) == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def test_grpo_train_chunk_runs_the_recall_task_on_a_chunk(tmp_path):
    tokenizer = tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path, tokenizer, hidden_size=32, seed=0))
    locas_model = attach(model.eval(), width=8)
    optimizer = torch.optim.Adam(locas_model.memory.parameters(), lr=1e-2)
    chunk = torch.tensor(tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4))
    settings = GrpoSettings(group_size=3, max_new_tokens=4, prompt_tokens=8, continuation_tokens=4, prompts_per_chunk=2)

    result = grpo_train_chunk(locas_model, optimizer, chunk, tokenizer, settings, locas_model.memory.clip_, 3)
    assert 0.0 <= result["reward"] <= 1.0 and math.isfinite(result["loss"]) and result["kl"] == 0.0
    short = grpo_train_chunk(locas_model, optimizer, chunk[:11], tokenizer, settings)
    assert short == {"reward": None, "loss": None, "kl": None}


def test_grpo_train_chunk_asks_for_the_chunks_continuations(monkeypatch):
    calls = []
    monkeypatch.setattr(grpo, "grpo_step", lambda *args, **kwargs: calls.append((args, kwargs)) or {})
    tokenizer = tiny_tokenizer()
    chunk = torch.arange(40)
    settings = GrpoSettings(prompt_tokens=6, continuation_tokens=3, prompts_per_chunk=2, seed=10)
    grpo_train_chunk("model", "optimizer", chunk, tokenizer, settings, "clip", chunk_index=3)

    (model, optimizer, prompts, reward_fn, passed_settings, after_step), kwargs = calls[0]
    expected = recall_prompts(chunk, 6, 3, 2, seed=13)
    assert (model, optimizer, passed_settings, after_step, kwargs["seed"]) == (
        "model",
        "optimizer",
        settings,
        "clip",
        13,
    )
    assert torch.equal(prompts, torch.stack([prompt for prompt, _ in expected]))
    assert [a.tolist() for a in kwargs["answers"]] == [continuation.tolist() for _, continuation in expected]
    text = torch.tensor(tokenizer.encode(" lazy dog"))
    assert reward_fn(text, text) == 1.0


def test_mean_recall_reward_samples_what_grpo_train_chunk_trains_on_without_training(tmp_path, monkeypatch):
    # a reward that tells samples apart (token F1 of a random model's samples is almost always 0)
    monkeypatch.setattr(grpo, "recall_reward", lambda tokenizer: lambda sample, truth: (sample < 160).float().mean())
    tokenizer = tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path, tokenizer, hidden_size=32, seed=0))
    locas_model = attach(model.eval(), width=8)
    with torch.no_grad():
        locas_model.memory.down.normal_(generator=torch.Generator().manual_seed(0))
    down = locas_model.memory.down.detach().clone()
    chunk = torch.tensor(tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4))
    settings = GrpoSettings(group_size=4, max_new_tokens=6, prompt_tokens=3, continuation_tokens=6, seed=2)

    measured = grpo.mean_recall_reward(locas_model, chunk, tokenizer, settings, chunk_index=5)
    assert grpo.mean_recall_reward(locas_model, chunk, tokenizer, settings, chunk_index=6) != measured  # other draws
    assert torch.equal(locas_model.memory.down, down)  # nothing trained
    optimizer = torch.optim.Adam(locas_model.memory.parameters(), lr=1e-2)
    trained = grpo_train_chunk(locas_model, optimizer, chunk, tokenizer, settings, chunk_index=5)
    assert trained["reward"] == measured  # the same prompts and samples
    assert grpo.mean_recall_reward(locas_model, chunk[:8], tokenizer, settings) is None


def test_grpo_train_text_takes_fresh_prompts_and_samples_each_step(monkeypatch):
    calls = []
    monkeypatch.setattr(grpo, "grpo_train_chunk", lambda *args: calls.append(args) or {"reward": 0.5})
    locas_model = memory_model()
    text = torch.arange(30)
    settings = GrpoSettings(prompt_tokens=6, continuation_tokens=4)
    stats = grpo.grpo_train_text(locas_model, text, "tokenizer", settings, steps=3, progress=False)
    assert stats == [{"reward": 0.5}] * 3
    assert [call[-1] for call in calls] == [0, 1, 2]  # the chunk index seeds each step's prompts and samples
    assert all(call[2] is text and call[5] == locas_model.memory.clip_ for call in calls)
    optimizers = {id(call[1]) for call in calls}
    assert len(optimizers) == 1  # one AdamW across the steps
    with pytest.raises(ValueError, match="the text has 9 tokens, fewer than one recall prompt"):
        grpo.grpo_train_text(locas_model, text[:9], "tokenizer", settings, steps=1, progress=False)
