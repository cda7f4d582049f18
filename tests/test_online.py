import dataclasses
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_fixtures import TEXT, save_tiny_model, tiny_tokenizer
from conftest import tiny_model
from transformers import AutoModelForCausalLM

import locas
from locas.model import target_nll
from locas.training import grpo
from locas.training.config import GRPO_LOSSES, GrpoSettings, OnlineConfig, same_settings
from locas.training.losses import LOSSES, LossInputs, mix, nll_and_distillation_kl, ntp, sd
from locas.training.offline import train_on_windows
from locas.training.online import ChunkRecord, chunk_spans, run_online, run_online_batch

SMALL = dict(chunk_size=16, context_window=16, width=8, lora_rank=4)


def stream(length=120, seed=0):
    return torch.randint(0, 128, (length,), generator=torch.Generator().manual_seed(seed))


def scores(result):
    return [record.nll_sum for record in result.records]


def test_chunks_cover_the_stream_and_the_first_token_is_never_scored():
    assert chunk_spans(40, 16) == [(0, 16), (16, 32), (32, 40)]
    result = run_online(tiny_model("llama"), stream(40), OnlineConfig(method="none", **SMALL), progress=False)
    assert [r.targets for r in result.records] == [15, 16, 8] and result.tokens == 39


@pytest.mark.parametrize("method", ["locas", "lora"])
def test_score_is_taken_before_the_update_with_the_previous_state(method):
    """Chunk k's recorded score equals a fresh evaluation with the learner as it stood after chunk k-1."""
    tokens = stream()
    config = OnlineConfig(method=method, lr=1e-2, **SMALL)
    model = tiny_model("qwen3")
    snapshots = []

    def snapshot(record, learner):
        # Logits of the next chunk's window with the state after this chunk's update.
        start, end = record.end, min(record.end + 16, tokens.numel())
        if start < tokens.numel():
            with torch.no_grad():
                logits = learner.logits(tokens[max(0, start - 16) : end].unsqueeze(0), end - start + 1)[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits[0], tokens[start:end], reduction="sum").item()
            snapshots.append(nll)

    result = run_online(model, tokens, config, progress=False, on_chunk=snapshot)
    assert scores(result)[1:] == pytest.approx(snapshots, rel=1e-5)
    with torch.no_grad():  # chunk 0 is scored by the untouched backbone (zero memory / fresh adapter)
        none = run_online(model, tokens[:16], OnlineConfig(method="none", **SMALL), progress=False)
    assert scores(result)[0] == pytest.approx(scores(none)[0], rel=1e-6)
    assert scores(result)[1] != pytest.approx(
        scores(run_online(model, tokens, OnlineConfig(method="none", **SMALL), progress=False))[1], rel=1e-6
    )


def test_a_chunks_score_depends_only_on_its_window_and_what_precedes_it():
    tokens = stream()
    config = OnlineConfig(method="locas", lr=1e-2, **SMALL)
    base = scores(run_online(tiny_model("llama"), tokens, config, progress=False))
    later_changed = tokens.clone()
    later_changed[70:] = (later_changed[70:] + 1) % 128  # chunk 4 starts at 64
    changed = scores(run_online(tiny_model("llama"), later_changed, config, progress=False))
    assert changed[:4] == base[:4] and changed[4] != base[4]
    # Without training, a token more than one window before the chunk cannot matter.
    none = OnlineConfig(method="none", **SMALL)
    far_changed = tokens.clone()
    far_changed[10] = (far_changed[10] + 1) % 128
    plain, far = (scores(run_online(tiny_model("llama"), t, none, progress=False)) for t in (tokens, far_changed))
    assert far[3:] == plain[3:] and far[0] != plain[0]


@pytest.mark.parametrize("method", ["locas", "lora"])
def test_resume_after_an_interruption_ends_with_the_same_numbers(method, tmp_path):
    tokens = stream(160)
    config = OnlineConfig(method=method, lr=1e-2, **SMALL)
    whole = run_online(tiny_model("gpt2"), tokens, config, progress=False)

    def interrupt(record, learner):
        if record.index == 6:
            raise KeyboardInterrupt

    state = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        run_online(
            tiny_model("gpt2"), tokens, config, state_path=state, save_every=3, progress=False, on_chunk=interrupt
        )
    saved = torch.load(state, weights_only=False)
    assert len(saved["records"][0]) == 6  # saved after chunks 3 and 6, interrupted in the 7th
    resumed = run_online(tiny_model("gpt2"), tokens, config, state_path=state, save_every=3, progress=False)
    assert scores(resumed) == scores(whole)
    if method == "locas":
        assert torch.equal(resumed.memory.down, whole.memory.down)
    with pytest.raises(ValueError, match=r"used other settings \(lr 0.01 -> 0.02\)"):
        run_online(tiny_model("gpt2"), tokens, dataclasses.replace(config, lr=2e-2), state_path=state, progress=False)


def test_a_state_saved_with_one_optimizer_group_resumes(tmp_path):
    """Before keys had a learning rate of their own, the optimiser held one group of every memory tensor."""
    tokens, config, state = stream(160), OnlineConfig(method="locas", lr=1e-2, **SMALL), tmp_path / "state.pt"
    whole = run_online(tiny_model("llama"), tokens, config, progress=False)

    def interrupt(record, learner):
        if record.index == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_online(
            tiny_model("llama"), tokens, config, state_path=state, save_every=3, progress=False, on_chunk=interrupt
        )
    saved = torch.load(state, weights_only=False)
    keys, values = saved["optimizer"]["param_groups"]
    assert keys["lr"] == values["lr"] == 1e-2 and len(keys["params"]) == 2  # up and gate, then down
    saved["optimizer"]["param_groups"] = [{**values, "params": keys["params"] + values["params"]}]
    torch.save(saved, state)
    resumed = run_online(tiny_model("llama"), tokens, config, state_path=state, progress=False)
    assert scores(resumed) == scores(whole)
    torch.testing.assert_close(resumed.memory.down, whole.memory.down)


def test_self_distillation_with_the_same_context_and_a_zero_memory_is_exactly_zero():
    tokens = stream()
    config = OnlineConfig(method="locas", loss="sd", teacher_window=16, lr=1e-2, **SMALL)
    same_context = run_online(tiny_model("gemma"), tokens, config, progress=False)
    assert same_context.records[0].loss == 0.0  # memorized at chunk 0: zero values, same logits as the teacher
    longer = run_online(tiny_model("gemma"), tokens, dataclasses.replace(config, teacher_window=64), progress=False)
    assert longer.records[0].loss == 0.0  # chunk 0 has no earlier tokens: both see the same context
    assert (
        longer.records[2].loss > 1e-6
    )  # far above rounding (1e-9): from chunk 2 on, the teacher sees 32 previous tokens, the student 16
    ntp_run = run_online(tiny_model("gemma"), tokens, dataclasses.replace(config, loss="ntp"), progress=False)
    assert ntp_run.records[0].loss == pytest.approx(ntp_run.records[0].nll_sum / 15, rel=1e-6)


def test_losses_against_hand_computed_values():
    student = torch.tensor([[[0.0, 1.0, 2.0]]])
    teacher = torch.tensor([[[2.0, 1.0, 0.0]]])
    targets = torch.tensor([[2]])
    p_student, p_teacher = student.softmax(-1), teacher.softmax(-1)
    expected_kl = (p_teacher * (p_teacher.log() - p_student.log())).sum()
    inputs = LossInputs(student, targets, teacher=lambda: teacher, options={"mix_alpha": 0.25})
    assert ntp(inputs).item() == pytest.approx(-p_student[0, 0, 2].log().item(), rel=1e-6)
    assert sd(inputs).item() == pytest.approx(expected_kl.item(), rel=1e-6)
    assert mix(inputs).item() == pytest.approx(0.25 * ntp(inputs).item() + 0.75 * expected_kl.item(), rel=1e-6)
    assert sd(LossInputs(student, targets, teacher=lambda: student)).item() == 0
    with pytest.raises(ValueError, match="needs a teacher"):
        sd(LossInputs(student, targets))


def test_each_rows_loss_is_the_mean_over_its_own_targets_and_the_nll_is_computed_once():
    torch.manual_seed(0)
    student = torch.randn(2, 5, 7, requires_grad=True)
    teacher = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])  # row 1: a shorter document, padded
    batch = LossInputs(student, targets, teacher=lambda: teacher, mask=mask)
    for loss in (ntp, sd, mix):
        alone = [
            loss(
                LossInputs(
                    student[i : i + 1, :n], targets[i : i + 1, :n], teacher=lambda i=i, n=n: teacher[i : i + 1, :n]
                )
            )
            for i, n in enumerate((5, 3))
        ]
        assert torch.allclose(loss(batch), torch.cat(alone), atol=1e-6)
    assert batch.token_nll() is batch.token_nll()  # the trainer's score reads the loss's own NLL
    scored_first = LossInputs(student, targets, mask=mask)
    with torch.no_grad():
        scored_first.token_nll()  # read without grad first: a loss afterwards still trains
    ntp(scored_first).sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert batch.row_sum(batch.token_nll())[1].item() == pytest.approx(
        F.cross_entropy(student[1, :3], targets[1, :3], reduction="sum").item(), rel=1e-6
    )


def test_memory_grows_by_fresh_slots_up_to_max_width():
    widths = []
    config = OnlineConfig(method="locas", grow_by=4, max_width=20, lr=1e-2, **SMALL)
    result = run_online(
        tiny_model("mistral"),
        stream(),
        config,
        progress=False,
        on_chunk=lambda record, learner: widths.append(learner.memory.width),
    )
    assert widths == [8, 12, 16, 20, 20, 20, 20, 20]
    assert result.trainable_parameters == 3 * 2 * 20 * 32


def test_memory_learns_text_it_cannot_see_in_its_window():
    pattern = stream(48, seed=3)
    tokens = pattern.repeat(6)  # each repeat lies beyond the 16-token window: only the memory can recall it
    none = run_online(tiny_model("llama"), tokens, OnlineConfig(method="none", **SMALL), progress=False)
    locas = run_online(
        tiny_model("llama"),
        tokens,
        OnlineConfig(method="locas", lr=5e-2, steps_per_chunk=3, tau_rule="paper", **{**SMALL, "width": 16}),
        progress=False,
    )
    assert locas.nll < none.nll - 0.05


@pytest.mark.parametrize("method", ["locas", "lora"])
def test_the_backbone_is_given_back_unchanged(method, tokens):
    model = tiny_model("qwen2")
    with torch.no_grad():
        before = model(tokens).logits
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    run_online(model, stream(), OnlineConfig(method=method, lr=1e-2, **SMALL), progress=False)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, before)


def test_method_defaults_and_refusals():
    assert OnlineConfig(method="locas").resolved().lr == 4e-3
    assert OnlineConfig(method="locas").resolved().steps_per_chunk == 1
    lora = OnlineConfig(method="lora").resolved()  # the sweep's best TempLoRA on the development books
    assert (lora.lr, lora.steps_per_chunk, lora.lora_rank, lora.lora_alpha) == (1e-3, 1, 64, 64.0)
    assert OnlineConfig(method="long", context_window=32, long_factor=4).window == 128
    with pytest.raises(ValueError, match="unknown method 'big'"):
        OnlineConfig(method="big").resolved()
    with pytest.raises(ValueError, match="chunk_size 64 is larger than context_window 32"):
        OnlineConfig(chunk_size=64, context_window=32).resolved()
    with pytest.raises(ValueError, match="unknown loss"):
        OnlineConfig(loss="kl").resolved()
    with pytest.raises(ValueError, match="fewer than one chunk"):
        run_online(tiny_model("llama"), stream(10), OnlineConfig(**SMALL), progress=False)


def test_run_online_takes_one_stream_and_refuses_several_rows_or_ids_it_cannot_read():
    model, config = tiny_model("llama"), OnlineConfig(method="none", **SMALL)
    tokens = stream(48)
    flat = run_online(model, tokens, config, progress=False)
    assert scores(run_online(model, tokens.unsqueeze(0), config, progress=False)) == scores(flat)  # (1, N)
    with pytest.raises(ValueError, match=r"token_ids has shape \(2, 24\).*run_online_batch"):
        run_online(model, tokens.view(2, 24), config, progress=False)  # was: the rows run as one stream
    with pytest.raises(ValueError, match=r"token_ids must be token ids of dtype torch.long, got torch.float32"):
        run_online(model, tokens.float(), config, progress=False)
    with pytest.raises(TypeError, match=r"token_ids must be a 1-D tensor of token ids, got list"):
        run_online(model, tokens.tolist(), config, progress=False)
    with pytest.raises(ValueError, match=r"outside the model's vocabulary 0..127 \(min \d+, max 128\)"):
        run_online(model, torch.cat([tokens, torch.tensor([128])]), config, progress=False)
    with pytest.raises(ValueError, match=r"documents\[1\] has shape \(2, 24\)"):
        run_online_batch(model, [tokens, tokens.view(2, 24)], config, progress=False)
    with pytest.raises(ValueError, match="documents must be a list"):
        run_online_batch(model, tokens, config, progress=False)


@pytest.mark.parametrize(
    "options, terms",
    [
        (dict(method="none", chunk_size=64, context_window=256), "chunk_size 64 \\+ context_window 256 = 320"),
        (
            dict(method="long", chunk_size=16, context_window=64, long_factor=4),
            "chunk_size 16 \\+ context_window 64 x long_factor 4 = 272",
        ),
        (
            dict(method="locas", loss="sd", chunk_size=16, context_window=16, teacher_window=256),
            "chunk_size 16 \\+ teacher_window 256 = 272",
        ),
    ],
)
def test_windows_longer_than_the_models_positions_are_refused_up_front(options, terms):
    """GPT-2 learns `n_positions` positions (256 for the tiny one): a longer window fails deep in the forward."""
    model = tiny_model("gpt2")
    config = OnlineConfig(**{**SMALL, **options})
    with pytest.raises(ValueError, match=f"longest window is {terms} tokens, but the model has 256 positions"):
        run_online(model, stream(400), config, progress=False)
    with pytest.raises(ValueError, match="256 positions"):
        run_online_batch(model, [stream(400), stream(300, seed=1)], config, progress=False)
    run_online(model, stream(240), config, progress=False)  # a text shorter than the window: shorter windows
    with pytest.raises(ValueError, match=r", cut to the longest text's 270 tokens\) = 270 tokens, but the model has"):
        run_online(model, stream(270), config, progress=False)


def test_a_text_with_no_more_than_memorize_at_chunks_is_refused():
    model, config = tiny_model("llama"), OnlineConfig(method="locas", memorize_at=10, lr=1e-2, **SMALL)
    with pytest.raises(ValueError, match="memorize_at=10, but the text has 3 chunks of 16 tokens"):
        run_online(model, stream(48), config, progress=False)  # was: nothing trained, the `none` numbers
    with pytest.raises(ValueError, match="memorize_at=2, but document 1 has 2 chunks") as refused:
        run_online_batch(model, [stream(48), stream(32)], dataclasses.replace(config, memorize_at=2), progress=False)
    assert run_online(model, stream(48), dataclasses.replace(config, memorize_at=2), progress=False).memory is not None
    from locas.cli import _trainer_flags

    hint = "so every text needs more than 2 chunks; lower --memorize-at or --chunk-size"
    assert _trainer_flags(str(refused.value)).endswith(hint)


def test_numeric_options_of_the_wrong_type_are_refused_by_name():
    cases = [
        (dict(lr="1e-3"), "lr must be a number, got '1e-3' \\(str\\)"),
        (dict(chunk_size=64.0), "chunk_size must be an integer, got 64.0 \\(float\\)"),
        (dict(width=True), "width must be an integer, got True \\(bool\\)"),
        (dict(method="lora", lora_alpha="8"), "lora_alpha must be a number, got '8' \\(str\\)"),
        (dict(max_width=12.5), "max_width must be an integer, got 12.5"),
        (dict(loss="grpo", grpo_temperature="hot"), "grpo_temperature must be a number, got 'hot'"),
        (dict(method="lora", lora_targets=["q_proj"]), "lora_targets must be a string"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            OnlineConfig(**options).resolved()
    config = OnlineConfig(lr=1, output_ratio=1, max_width=None, chunk_size=np.int64(16), context_window=16).resolved()
    assert config.lr == 1 and config.chunk_size == 16  # a float option takes an int; an int one numpy's ints
    with pytest.raises(ValueError, match="prompt_tokens must be an integer, got 6.0"):
        GrpoSettings(prompt_tokens=6.0)


def test_the_resume_refusal_names_the_preset_as_an_option(tmp_path):
    """A Python user passes preset='paper'; the CLI shows the same message with its flags."""
    from locas.cli import _trainer_flags

    model, config, state = tiny_model("llama"), OnlineConfig(method="none", **SMALL), tmp_path / "state.pt"
    run_online(model, stream(48), config, state_path=state, progress=False)
    with pytest.raises(ValueError, match="used other settings") as refused:
        run_online(model, stream(48), dataclasses.replace(config, chunk_size=8), state_path=state, progress=False)
    message = str(refused.value)
    assert "(e.g. preset='paper' for a run saved before the default changed)" in message and "--" not in message
    assert "(--chunk-size 16 -> 8); pass its settings to resume it (e.g. --preset='paper' for a run" in (
        _trainer_flags(message)
    )


def test_records_round_trip_as_plain_data():
    record = ChunkRecord(index=0, start=0, end=16, targets=15, nll_sum=3.0, seconds=0.1)
    assert ChunkRecord(**dataclasses.asdict(record)) == record


@pytest.mark.parametrize("method", ["locas", "lora"])
def test_a_finished_run_can_be_put_back_on_the_backbone(method, tokens):
    from locas.training.online import trained

    model = tiny_model("llama")
    with torch.no_grad():
        bare = model(tokens).logits
    result = run_online(model, stream(), OnlineConfig(method=method, lr=5e-2, **SMALL), progress=False)
    with trained(model, result) as learner, torch.no_grad():
        adapted = learner.logits(tokens, tokens.shape[1])
        generated = learner.generate(input_ids=tokens[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert not torch.allclose(adapted, bare) and generated.shape == (1, 7)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, bare)  # given back after the block


def test_options_a_method_does_not_use_do_not_tell_runs_apart():
    assert OnlineConfig(method="none", lr=0.5, width=3).resolved() == OnlineConfig(method="none").resolved()
    assert OnlineConfig(method="lora", width=3).resolved() == OnlineConfig(method="lora").resolved()
    assert OnlineConfig(method="locas", lora_rank=3).resolved() == OnlineConfig(method="locas").resolved()
    assert OnlineConfig(method="locas", width=3).resolved() != OnlineConfig(method="locas").resolved()
    with pytest.raises(ValueError, match="chunk_size must be at least 2"):
        OnlineConfig(chunk_size=1).resolved()


def test_resume_refuses_a_state_saved_over_another_text(tmp_path):
    config = OnlineConfig(method="none", **SMALL)
    run_online(tiny_model("llama"), stream(), config, state_path=tmp_path / "s.pt", progress=False)
    with pytest.raises(ValueError, match="read another text"):
        run_online(tiny_model("llama"), stream(seed=9), config, state_path=tmp_path / "s.pt", progress=False)


def test_resume_refuses_a_state_saved_with_other_model_weights(tmp_path):
    config = OnlineConfig(method="locas", lr=1e-2, **SMALL)
    run_online(tiny_model("llama"), stream(), config, state_path=tmp_path / "s.pt", save_every=1, progress=False)
    with pytest.raises(ValueError, match="was made with other model weights"):
        run_online(tiny_model("llama", seed=1), stream(), config, state_path=tmp_path / "s.pt", progress=False)
    run_online(tiny_model("llama").bfloat16(), stream(), config, state_path=tmp_path / "s.pt", progress=False)
    deeper_config = tiny_model("llama").config
    deeper_config.num_hidden_layers = 3
    deeper = AutoModelForCausalLM.from_config(deeper_config)
    with pytest.raises(ValueError, match="was made with other model weights"):  # (was: a shape error)
        run_online(deeper, stream(), config, state_path=tmp_path / "s.pt", progress=False)


def test_lora_seeding_leaves_the_callers_random_state_alone():
    model = tiny_model("llama")  # (seeds the global generator itself)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_online(model, stream(40), OnlineConfig(method="lora", **SMALL), progress=False)
    assert torch.equal(torch.rand(3), expected)


BATCH_CASES = {
    "none": dict(method="none"),
    "locas ntp, growth": dict(method="locas", lr=2e-2, steps_per_chunk=2, grow_by=4, max_width=16),
    "locas mix, random_index": dict(method="locas", lr=2e-2, loss="mix", teacher_window=32, memory_init="random_index"),
    "locas, tau rule output": dict(method="locas", lr=2e-2, tau_rule="output", grow_by=4, max_width=12),
    "locas, tau rule paper": dict(method="locas", lr=2e-2, tau_rule="paper"),
}


@pytest.mark.parametrize("case", list(BATCH_CASES))
def test_documents_adapted_in_one_batch_equal_separate_runs(case, one_thread):
    config = OnlineConfig(**{**SMALL, **BATCH_CASES[case]})
    documents = [stream(100, seed=1), stream(75, seed=2), stream(90, seed=3)]  # 7, 5 and 6 chunks, uneven ends
    model = tiny_model("gemma")
    together = run_online_batch(model, documents, config, progress=False)
    for document, batched in zip(documents, together, strict=True):
        alone = run_online(model, document, config, progress=False)
        assert [r.targets for r in batched.records] == [r.targets for r in alone.records]
        assert scores(batched) == pytest.approx(scores(alone), rel=1e-5)
        if config.method == "locas":
            assert [r.loss for r in batched.records] == pytest.approx([r.loss for r in alone.records], rel=1e-4)
            for name, tensor in alone.memory.slot_tensors().items():
                torch.testing.assert_close(batched.memory.slot_tensors()[name], tensor, rtol=1e-4, atol=1e-6)
            assert batched.trainable_parameters == alone.trainable_parameters
            torch.testing.assert_close(batched.memory.tau, alone.memory.tau)  # output rule: each text its own


@pytest.mark.parametrize("loss", ["ntp", "mix"])
def test_a_window_prefix_keeps_batched_runs_equal_to_separate_ones(loss, monkeypatch, one_thread):
    import locas.training.online as online_module

    monkeypatch.setattr(online_module, "window_prefix", lambda tokenizer: [1])  # a <bos> before every window
    config = OnlineConfig(**{**SMALL, "method": "locas", "lr": 2e-2, "loss": loss, "teacher_window": 32})
    documents = [stream(100, seed=1), stream(75, seed=2)]
    model = tiny_model("gemma")
    together = run_online_batch(model, documents, config, progress=False, tokenizer=object())
    for document, batched in zip(documents, together, strict=True):
        alone = run_online(model, document, config, progress=False, tokenizer=object())
        assert scores(batched) == pytest.approx(scores(alone), rel=1e-5)
        assert [r.loss for r in batched.records] == pytest.approx([r.loss for r in alone.records], rel=1e-4)
        assert scores(alone) != pytest.approx(scores(run_online(model, document, config, progress=False)), rel=1e-6)


def test_a_batched_run_resumes_and_lora_refuses_a_batch(tmp_path, one_thread):
    config = OnlineConfig(method="locas", lr=2e-2, **SMALL)
    documents = [stream(100, seed=1), stream(70, seed=2)]
    whole = run_online_batch(tiny_model("llama"), documents, config, progress=False)

    def interrupt(row, record, learner):
        if record.index == 5:  # document 1 finished at chunk 4: its final state is in the saved file
            raise KeyboardInterrupt

    state = tmp_path / "batch.pt"
    with pytest.raises(KeyboardInterrupt):
        run_online_batch(tiny_model("llama"), documents, config, state_path=state, save_every=5, on_chunk=interrupt)
    resumed = run_online_batch(tiny_model("llama"), documents, config, state_path=state, progress=False)
    for before, after in zip(whole, resumed, strict=True):
        assert scores(after) == scores(before)
        assert torch.equal(after.memory.down, before.memory.down)
    with pytest.raises(ValueError, match="adapts 1 document at a time"):
        run_online_batch(tiny_model("llama"), documents, OnlineConfig(method="lora", **SMALL), progress=False)
    with pytest.raises(ValueError, match="document 1 has 10 tokens"):
        run_online_batch(tiny_model("llama"), [stream(40), stream(10)], config, progress=False)


# --- GRPO as the training loss -----------------------------------------------------------------------

GRPO_SMALL = dict(
    SMALL,
    lr=5e-2,
    grpo_group_size=3,
    grpo_prompts_per_chunk=2,
    grpo_prompt_tokens=6,
    grpo_continuation_tokens=4,
    grpo_max_new_tokens=4,
)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """(a function giving a fresh tiny model with a real tokenizer, the tokenizer, the text's first 100 tokens:
    6 chunks of 16 and a last chunk of 4, too short for a recall prompt of 6 + 4)."""
    tokenizer = tiny_tokenizer()
    folder = save_tiny_model(tmp_path_factory.mktemp("grpo"), tokenizer, hidden_size=32, seed=0)
    return (
        lambda: AutoModelForCausalLM.from_pretrained(folder).eval(),
        tokenizer,
        torch.tensor(tokenizer.encode(TEXT)[:100]),
    )


@pytest.fixture
def dense_reward(monkeypatch):
    """Token F1 is almost never earned by a random model (all rewards 0: no gradient); this stand-in rewards
    the share of low token ids, so that every group's samples differ and GRPO moves the memory. Records the
    tokenizer the trainer passed."""
    tokenizers = []

    def reward_of(tokenizer):
        tokenizers.append(tokenizer)
        return lambda completion_ids, continuation_ids: (completion_ids < 160).float().mean().item()

    monkeypatch.setattr(grpo, "recall_reward", reward_of)
    return tokenizers


def test_grpo_losses_are_refused_where_they_cannot_run(text_model):
    new_model, tokenizer, tokens = text_model
    with pytest.raises(ValueError, match="loss 'grpo' trains a Locas memory"):
        OnlineConfig(method="lora", loss="grpo").resolved()
    with pytest.raises(ValueError, match="loss 'grpo' has no token-loss steps; use loss 'ntp\\+grpo'"):
        OnlineConfig(loss="grpo", steps_per_chunk=2).resolved()
    with pytest.raises(ValueError, match="grpo_group_size must be at least 2"):
        OnlineConfig(loss="ntp+grpo", grpo_group_size=1).resolved()
    with pytest.raises(ValueError, match="grpo_clip_epsilon must be in"):
        OnlineConfig(loss="grpo", grpo_clip_epsilon=1.0).resolved()
    for loss in GRPO_LOSSES:
        config = OnlineConfig(loss=loss, **GRPO_SMALL)
        with pytest.raises(ValueError, match="pass the model's tokenizer"):
            run_online(new_model(), tokens, config, progress=False)
        with pytest.raises(ValueError, match="one document at a time"):
            run_online_batch(new_model(), [tokens, tokens], config, progress=False, tokenizer=tokenizer)


def test_grpo_warns_when_no_chunk_can_hold_a_recall_prompt_and_its_continuation(text_model, dense_reward):
    """Every chunk goes untrained (all rewards None); a shorter last chunk still is (see `text_model`)."""
    new_model, tokenizer, tokens = text_model
    for loss in GRPO_LOSSES:
        too_long = OnlineConfig(loss=loss, **{**GRPO_SMALL, "grpo_prompt_tokens": 12, "grpo_continuation_tokens": 5})
        with pytest.warns(UserWarning, match="grpo_prompt_tokens 12 \\+ grpo_continuation_tokens 5 = 17 .* no chunk"):
            result = run_online(new_model(), tokens[:48], too_long, progress=False, tokenizer=tokenizer)
        assert all(record.grpo_reward is None for record in result.records)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fits = dataclasses.replace(too_long, grpo_continuation_tokens=4)
            result = run_online(new_model(), tokens[:48], fits, progress=False, tokenizer=tokenizer)
        assert any(record.grpo_reward is not None for record in result.records)


def test_unused_grpo_options_do_not_tell_runs_apart():
    assert OnlineConfig(grpo_beta=0.5, grpo_group_size=8).resolved() == OnlineConfig().resolved()  # loss ntp
    assert OnlineConfig(loss="grpo", grpo_beta=0.5).resolved() != OnlineConfig(loss="grpo").resolved()
    assert OnlineConfig(loss="ntp+grpo", grpo_beta=0.5).resolved() != OnlineConfig(loss="ntp+grpo").resolved()
    none = OnlineConfig(method="none", loss="grpo", grpo_beta=0.5).resolved()  # none trains nothing: no loss
    assert none == OnlineConfig(method="none").resolved()
    assert OnlineConfig(loss="grpo").resolved().steps_per_chunk == 0  # GRPO alone has no token-loss steps
    assert OnlineConfig(loss="ntp+grpo").resolved().steps_per_chunk == 1
    settings = OnlineConfig(loss="grpo", grpo_temperature=0.7, grpo_prompt_tokens=9, seed=5).grpo_settings()
    assert (settings.temperature, settings.prompt_tokens, settings.seed, settings.group_size) == (0.7, 9, 5, 4)


@pytest.mark.parametrize("loss", GRPO_LOSSES)
def test_grpo_scores_each_chunk_before_training_on_it_and_changes_the_memory(loss, text_model, dense_reward):
    new_model, tokenizer, tokens = text_model
    config = OnlineConfig(loss=loss, **GRPO_SMALL)
    snapshots = []

    def snapshot(record, learner):  # the next chunk's NLL with the memory as it stands after this chunk
        start, end = record.end, min(record.end + 16, tokens.numel())
        if start < tokens.numel():
            with torch.no_grad():
                logits = learner.logits(tokens[max(0, start - 16) : end].unsqueeze(0), end - start + 1)[:, :-1]
            snapshots.append(F.cross_entropy(logits[0], tokens[start:end], reduction="sum").item())

    result = run_online(new_model(), tokens, config, progress=False, on_chunk=snapshot, tokenizer=tokenizer)
    assert dense_reward and all(seen is tokenizer for seen in dense_reward)
    assert scores(result)[1:] == pytest.approx(snapshots, rel=1e-5)
    untrained = run_online(new_model(), tokens, OnlineConfig(method="none", **SMALL), progress=False)
    assert scores(result)[0] == pytest.approx(scores(untrained)[0], rel=1e-6)  # zero memory: the backbone's
    assert scores(result)[2] != pytest.approx(scores(untrained)[2], rel=1e-6)

    rewards = [r.grpo_reward for r in result.records]
    assert all(0 <= reward <= 1 for reward in rewards[:-1]) and rewards[-1] is None  # last chunk: 4 tokens
    ntp_only = run_online(new_model(), tokens, dataclasses.replace(config, loss="ntp"), progress=False)
    assert not torch.equal(result.memory.down, ntp_only.memory.down)
    if loss == "grpo":  # the memory learnt from GRPO alone; `loss` is GRPO's, before any update on the chunk
        assert result.memory.down.abs().sum() > 0
        assert result.records[0].grpo_kl == 0.0  # zero memory: the policy is the memory-less reference
        assert result.records[0].loss == pytest.approx(0.0, abs=1e-6)  # ratio 1, group-centred advantages
        assert result.records[-1].loss is None
    else:  # `loss` is the first NTP step's, which also gave the score
        assert result.records[0].loss == pytest.approx(result.records[0].nll_sum / 15, rel=1e-6)
        assert result.records[-1].loss is not None


@pytest.mark.parametrize("loss", GRPO_LOSSES)
def test_a_grpo_run_resumes_with_the_same_samples_and_numbers(loss, text_model, dense_reward, tmp_path):
    new_model, tokenizer, tokens = text_model
    config = OnlineConfig(loss=loss, **GRPO_SMALL)
    whole = run_online(new_model(), tokens, config, progress=False, tokenizer=tokenizer)

    def interrupt(record, learner):
        if record.index == 4:
            raise KeyboardInterrupt

    state = tmp_path / "state.pt"
    options = dict(state_path=state, save_every=2, progress=False, tokenizer=tokenizer)
    with pytest.raises(KeyboardInterrupt):
        run_online(new_model(), tokens, config, on_chunk=interrupt, **options)
    assert len(torch.load(state, weights_only=False)["records"][0]) == 4  # chunks 4-6 run again
    torch.manual_seed(99)  # the samples are seeded by the run, whatever the caller's random state
    resumed = run_online(new_model(), tokens, config, **options)
    assert scores(resumed) == scores(whole)
    assert [r.grpo_reward for r in resumed.records] == [r.grpo_reward for r in whole.records]
    assert torch.equal(resumed.memory.down, whole.memory.down)
    with pytest.raises(ValueError, match="used other settings"):
        run_online(new_model(), tokens, dataclasses.replace(config, grpo_beta=0.5), **options)


def test_a_state_saved_before_the_grpo_options_existed_still_resumes(tmp_path):
    config = OnlineConfig(method="locas", lr=1e-2, **SMALL).resolved()
    saved = {k: v for k, v in dataclasses.asdict(config).items() if not k.startswith("grpo_")}
    assert same_settings(saved, config) and same_settings(dataclasses.asdict(config), config)
    assert not same_settings({**saved, "width": 3}, config)
    assert not same_settings({**saved, "an_option_from_the_future": 1}, config) and not same_settings(None, config)


# --- tau rule, LoRA targets, presets -----------------------------------------------------------------


@pytest.mark.parametrize("tau_rule", ["paper", "neuron"])
def test_the_tau_rule_sets_the_memorys_output_scale(tau_rule):
    from locas.model import output_scales

    model = tiny_model("llama")
    result = run_online(model, stream(48), OnlineConfig(method="locas", tau_rule=tau_rule, **SMALL), progress=False)
    scales = output_scales(model) / (8 if tau_rule == "paper" else 1)  # SMALL's width is 8
    assert result.config.tau_rule == tau_rule and result.memory.metadata["tau_rule"] == tau_rule
    assert torch.allclose(result.memory.tau, scales.view(-1, 1, 1).expand(-1, 1, 8))


def test_the_default_preset_measures_tau_and_refuses_a_bad_output_ratio():
    config = OnlineConfig(method="locas").resolved()
    assert (config.tau_rule, config.output_ratio) == ("output", 0.1)
    result = run_online(tiny_model("llama"), stream(48), OnlineConfig(method="locas", **SMALL), progress=False)
    assert result.memory.metadata["tau_rule"] == "output" and result.memory.metadata["output_ratio"] == 0.1
    with pytest.raises(ValueError, match="output_ratio must be a positive number, got -1"):
        OnlineConfig(method="locas", output_ratio=-1).resolved()
    # only the output rule reads the ratio, so it never tells runs of another rule apart
    paper = dict(method="locas", tau_rule="paper")
    assert OnlineConfig(**paper, output_ratio=0.3).resolved() == OnlineConfig(**paper).resolved()
    assert OnlineConfig(method="locas", output_ratio=0.3).resolved() != config


def test_the_tau_rule_tells_locas_runs_apart_and_no_other():
    neuron, paper = dict(tau_rule="neuron", **SMALL), dict(tau_rule="paper", **SMALL)
    assert OnlineConfig(method="locas", **neuron).resolved() != OnlineConfig(method="locas", **paper).resolved()
    for method in ("lora", "none", "long"):
        assert OnlineConfig(method=method, **neuron).resolved() == OnlineConfig(method=method, **paper).resolved()
    with pytest.raises(ValueError, match="unknown tau_rule 'per_slot'; choose one of paper, neuron"):
        OnlineConfig(tau_rule="per_slot").resolved()


def test_keys_learn_at_their_own_rate_and_frozen_keys_stay_the_memorized_ones():
    from locas.initialization import memorize
    from locas.model import LocasModel

    model, tokens = tiny_model("llama"), stream(64)
    scorer = LocasModel(model)
    memorized = memorize(scorer, tokens[:16].unsqueeze(0), keep_top=8)  # chunk 0, as the trainer does
    scorer.detach()
    runs = {
        scale: run_online(
            model, tokens, OnlineConfig(method="locas", lr=1e-2, key_lr_scale=scale, **SMALL), progress=False
        )
        for scale in (0.0, 1.0)
    }
    frozen, both = runs[0.0].memory, runs[1.0].memory
    torch.testing.assert_close(frozen.up, memorized.up)
    torch.testing.assert_close(frozen.gate, memorized.gate)
    assert frozen.down.abs().sum() > 0 and not torch.allclose(both.up, memorized.up)
    assert scores(runs[0.0])[:1] == scores(runs[1.0])[:1] and scores(runs[0.0]) != scores(runs[1.0])
    assert runs[0.0].trainable_parameters == 2 * 8 * 32 and runs[1.0].trainable_parameters == 3 * 2 * 8 * 32
    grown = OnlineConfig(method="locas", lr=1e-2, key_lr_scale=0.0, grow_by=4, max_width=16, **SMALL)
    assert run_online(model, tokens, grown, progress=False).trainable_parameters == 2 * 16 * 32  # values only
    assert OnlineConfig(method="locas", key_lr_scale=0.5).resolved() != OnlineConfig(method="locas").resolved()
    assert OnlineConfig(method="lora", key_lr_scale=0.5).resolved() == OnlineConfig(method="lora").resolved()
    with pytest.raises(ValueError, match="key_lr_scale must be a number >= 0"):
        OnlineConfig(method="locas", key_lr_scale=-1.0).resolved()


def test_lora_targets_pick_the_adapted_modules():
    def trainable(targets):
        config = OnlineConfig(method="lora", lora_targets=targets, lr=1e-2, **SMALL)
        return run_online(tiny_model("llama"), stream(32), config, progress=False).trainable_parameters

    rank, hidden, mlp, layers = 4, 32, 48, 2  # q_proj and o_proj map 32 -> 32 (4 heads of 8)
    assert trainable("q_proj, o_proj") == layers * 2 * rank * (hidden + hidden)
    assert trainable("all") > trainable("q_proj,o_proj") + layers * rank * (hidden + mlp)  # + the MLP's
    with pytest.raises(ValueError, match="wq is not a module of llama models; choose all or some of q_proj,"):
        trainable("q_proj,wq")
    with pytest.raises(ValueError, match="lora_targets must be 'all' or module names separated by commas"):
        OnlineConfig(method="lora", lora_targets="q_proj,").resolved()
    assert OnlineConfig(method="locas", lora_targets="q_proj").resolved() == OnlineConfig(method="locas").resolved()


PAPER_LOCAS = dict(lr=4e-3, steps_per_chunk=1, width=64, memory_init="highest", tau_rule="paper", key_lr_scale=1.0)
PAPER_LORA = dict(lr=5e-5, steps_per_chunk=2, lora_rank=64, lora_alpha=64.0, lora_targets="all")


def test_the_paper_preset_is_the_papers_settings():
    locas = OnlineConfig(method="locas", preset="paper").resolved()
    assert {name: getattr(locas, name) for name in PAPER_LOCAS} == PAPER_LOCAS
    assert (locas.chunk_size, locas.context_window) == (1024, 2048)
    lora = OnlineConfig(method="lora", preset="paper").resolved()
    assert {name: getattr(lora, name) for name in PAPER_LORA} == PAPER_LORA
    assert lora.preset == "paper"  # recorded in the config, but it never tells two runs apart:
    assert lora == OnlineConfig(method="lora", preset="default", **PAPER_LORA).resolved()


def test_a_preset_fills_only_the_options_not_given(monkeypatch):
    from locas.training import config as training_config

    best = {"locas": {**PAPER_LOCAS, "lr": 1e-2, "tau_rule": "neuron"}, "lora": {**PAPER_LORA, "lora_rank": 8}}
    monkeypatch.setitem(training_config.PRESETS, "default", best)
    assert OnlineConfig(method="locas").resolved().lr == 1e-2
    assert OnlineConfig(method="locas").resolved().tau_rule == "neuron"
    assert OnlineConfig(method="locas", preset="paper").resolved().lr == 4e-3
    assert OnlineConfig(method="locas", lr=2e-3).resolved().lr == 2e-3  # an explicit value wins
    assert OnlineConfig(method="locas", tau_rule="paper").resolved().tau_rule == "paper"
    assert OnlineConfig(method="lora").resolved().lora_rank == 8
    assert OnlineConfig(method="lora", preset="paper").resolved().lora_rank == 64
    assert OnlineConfig(method="none").resolved() == OnlineConfig(method="none", preset="paper").resolved()
    with pytest.raises(ValueError, match="unknown preset 'best'; choose one of paper, default"):
        OnlineConfig(preset="best").resolved()


def test_a_config_saved_before_tau_rules_presets_and_lora_targets_still_matches():
    for method in ("locas", "lora"):  # such a config has the paper's settings (its only ones then)
        config = OnlineConfig(method=method, preset="paper", **SMALL).resolved()
        new_options = ("tau_rule", "output_ratio", "lora_targets", "key_lr_scale", "preset")
        saved = {k: v for k, v in dataclasses.asdict(config).items() if k not in new_options}
        assert same_settings(saved, config)
        if method == "locas":
            assert not same_settings(saved, dataclasses.replace(config, key_lr_scale=0.1))
        assert not same_settings(saved, dataclasses.replace(config, tau_rule="neuron", lora_targets="q_proj"))


def test_ntp_then_grpo_needs_ntp_steps():
    with pytest.raises(ValueError, match="steps_per_chunk 0 with loss 'ntp\\+grpo' leaves GRPO alone"):
        OnlineConfig(method="locas", loss="ntp+grpo", steps_per_chunk=0).resolved()


def test_top_layers_train_the_memory_in_the_top_layers_only():
    model = tiny_model("llama")  # 2 layers: 0.5 is the top one
    config = OnlineConfig(method="locas", tau_rule="paper", lr=5e-2, top_layers=0.5, **SMALL)
    top = run_online(model, stream(48), config, progress=False)
    every = run_online(model, stream(48), dataclasses.replace(config, top_layers=1.0), progress=False)
    assert top.memory.down[0].abs().sum() == 0 and top.memory.down[1].abs().sum() > 0
    assert top.trainable_parameters * 2 == every.trainable_parameters
    assert scores(top)[0] == pytest.approx(scores(every)[0]) and scores(top)[1:] != pytest.approx(scores(every)[1:])
    with pytest.raises(ValueError, match=r"top_layers must be a fraction in \(0, 1\] of the layers, got 0"):
        OnlineConfig(method="locas", top_layers=0).resolved()


# --- compiled runs: one shape per chunk ------------------------------------------------------------

FIXED_SHAPE_CASES = {
    "none": dict(method="none"),
    "locas ntp": dict(method="locas", lr=2e-2, steps_per_chunk=2),
    "locas mix (teacher window)": dict(method="locas", lr=2e-2, loss="mix", teacher_window=40),
    "locas sd (teacher window past the text)": dict(method="locas", lr=2e-2, loss="sd", teacher_window=200),
    "lora": dict(method="lora", lr=2e-2),
}


@pytest.mark.parametrize("case", list(FIXED_SHAPE_CASES))
def test_compiled_runs_read_one_shape_per_chunk_and_give_the_eager_numbers(case, monkeypatch, one_thread):
    """Under `compile`, every window is padded to its full length and the targets to a chunk; torch.compile is
    replaced by the module itself here, so that only the padding differs from the eager run."""
    config = OnlineConfig(**{**SMALL, **FIXED_SHAPE_CASES[case]})
    documents = [stream(100, seed=1), stream(75, seed=2)]  # uneven ends, last chunks shorter than a chunk
    model = tiny_model("llama")
    eager = [run_online(model, document, config, progress=False) for document in documents]
    monkeypatch.setattr(torch, "compile", lambda module, mode: module)
    shapes = []
    decoder = model.model  # (peft calls the causal LM's forward directly, its decoder through its hooks)
    hook = decoder.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    fixed_config = dataclasses.replace(config, compile="default")
    try:
        fixed = [run_online(model, document, fixed_config, progress=False) for document in documents]
        if config.method != "lora":  # lora adapts one document at a time
            batched = run_online_batch(model, documents, fixed_config, progress=False)
    finally:
        hook.remove()
    windows = [config.context_window, config.resolved().teacher_window or 0]  # the student's, the teacher's
    lengths = {min(window + config.chunk_size, text) for window in windows for text in (100, 75)}  # <= the text
    allowed = {torch.Size([rows, length]) for rows in (1, 2) for length in lengths}
    if config.method == "locas":
        allowed.add(torch.Size([1, config.chunk_size]))  # memorize reads the first chunk alone
    assert shapes and set(shapes) <= allowed
    for alone, padded in zip(eager, fixed, strict=True):
        assert [r.targets for r in padded.records] == [r.targets for r in alone.records]
        assert scores(padded) == pytest.approx(scores(alone), rel=1e-5)
        if config.method != "none":
            assert [r.loss for r in padded.records] == pytest.approx([r.loss for r in alone.records], rel=1e-4)
        if alone.memory is not None:
            torch.testing.assert_close(padded.memory.down, alone.memory.down, rtol=1e-4, atol=1e-6)
    if config.method != "lora":
        for alone, together in zip(eager, batched, strict=True):
            assert scores(together) == pytest.approx(scores(alone), rel=1e-5)


def test_the_compile_mode_never_tells_runs_apart_and_a_bad_one_is_refused():
    assert same_settings(dataclasses.asdict(OnlineConfig().resolved()), OnlineConfig(compile="default").resolved())
    with pytest.raises(ValueError, match="unknown compile mode 'fast'; choose one of off, default"):
        OnlineConfig(compile="fast").resolved()
    with pytest.raises(ValueError, match="a growing memory changes shape every chunk"):
        OnlineConfig(compile="default", grow_by=4).resolved()


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_a_compiled_run_compiles_once_and_equals_the_eager_run(one_thread):
    config = OnlineConfig(**SMALL, method="locas", lr=2e-2)
    document = stream(100, seed=1)  # 7 chunks: a first one with no context, a short last one
    model = tiny_model("llama")
    eager = run_online(model, document, config, progress=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        compiled = run_online(model, document, dataclasses.replace(config, compile="default"), progress=False)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one compilation served every chunk
    finally:
        torch._dynamo.reset()
    assert scores(compiled) == pytest.approx(scores(eager), rel=1e-5)
    torch.testing.assert_close(compiled.memory.down, eager.memory.down, rtol=1e-4, atol=1e-6)


def test_training_through_a_float16_backbone_warns_and_bfloat16_does_not():
    config = OnlineConfig(method="locas", lr=1e-2, **SMALL)
    with pytest.warns(UserWarning, match="float16 backbone: without loss scaling"):
        run_online(tiny_model("llama").half(), stream(32), config, progress=False)
    locas_model, ids = locas.LocasModel(tiny_model("llama").half()), stream(32).unsqueeze(0)
    locas_model.memorize(ids, keep_top=4)
    with pytest.warns(UserWarning, match="float16 backbone"):
        train_on_windows(locas_model, ids, None, steps=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_online(tiny_model("llama").bfloat16(), stream(32), config, progress=False)
        run_online(tiny_model("llama").half(), stream(32), dataclasses.replace(config, method="none"), progress=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nll_and_distillation_kl_equal_cross_entropy_and_kl_div_in_value_and_gradient(dtype):
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(6, 40, generator=generator) * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(6, 40, generator=generator) * 3).to(dtype)
    targets = torch.randint(0, 40, (6,), generator=generator)

    def references(student):
        log_teacher = F.log_softmax(teacher.float(), -1)
        kl = F.kl_div(F.log_softmax(student.float(), -1), log_teacher, log_target=True, reduction="none").sum(-1)
        return F.cross_entropy(student.float(), targets, reduction="none"), kl

    # In float32, so that a bfloat16 reference is not rounded twice (each term's gradient, then their sum).
    student32 = student.detach().float().requires_grad_()
    for nll_weights, kl_weights in [torch.rand(2, 6, generator=generator), (torch.zeros(6), torch.rand(6))]:
        nll, kl = nll_and_distillation_kl(student, targets, teacher)
        (gradient,) = torch.autograd.grad((nll * nll_weights + kl * kl_weights).sum(), student)
        reference_nll, reference_kl = references(student32)
        (reference_gradient,) = torch.autograd.grad(
            (reference_nll * nll_weights + reference_kl * kl_weights).sum(), student32
        )
        assert nll.dtype == kl.dtype == torch.float32 and gradient.dtype == dtype
        torch.testing.assert_close(nll, reference_nll, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(kl, reference_kl, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gradient, reference_gradient.to(dtype))
    assert torch.equal(nll, target_nll(student, targets))  # NTP's score and SD/MIX's are the same numbers
    (nll_only,) = torch.autograd.grad(nll_and_distillation_kl(student, targets, teacher)[0].sum(), student)
    torch.testing.assert_close(nll_only, torch.autograd.grad(target_nll(student, targets).sum(), student)[0])
    assert nll_and_distillation_kl(teacher, targets, teacher)[1].abs().max() < 1e-6


def test_nll_and_distillation_kl_refuse_a_second_backward_and_a_second_derivative():
    student, teacher, targets = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10), torch.zeros(4).long()
    loss = sum(nll_and_distillation_kl(student, targets, teacher)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    (gradient,) = torch.autograd.grad(
        nll_and_distillation_kl(student, targets, teacher)[1].square().sum(), student, create_graph=True
    )
    with pytest.raises(RuntimeError, match="differentiate twice"):  # no silent second derivative
        gradient.sum().backward()


def test_sd_and_mix_keep_two_logits_sized_buffers_and_the_score_reuses_their_nll(monkeypatch):
    student = torch.randn(1, 5, 50, requires_grad=True)
    teacher = torch.randn(1, 5, 50)
    targets = torch.randint(0, 50, (1, 5))

    def logits_sized_buffers_kept(loss):
        kept = set()

        def keep(tensor):
            if tensor.shape[-1] == 50 and tensor.dtype == torch.float32 and tensor.data_ptr() != student.data_ptr():
                kept.add(tensor.data_ptr())
            return tensor

        inputs = LossInputs(student, targets, teacher=lambda: teacher)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            value = loss(inputs)
        return value, inputs, len(kept)

    mix_loss, mix_inputs, mix_kept = logits_sized_buffers_kept(mix)
    _, sd_inputs, sd_kept = logits_sized_buffers_kept(sd)
    apart_loss, _, apart_kept = logits_sized_buffers_kept(lambda inputs: 0.5 * ntp(inputs) + 0.5 * sd(inputs))
    assert (mix_kept, sd_kept, apart_kept) == (2, 2, 3)  # the student's log-probabilities once, the teacher's probs
    torch.testing.assert_close(mix_loss, apart_loss)
    monkeypatch.setattr(locas.training.losses, "target_nll", lambda *_: pytest.fail("the score computed the NLL again"))
    for inputs in (mix_inputs, sd_inputs):
        with torch.no_grad():  # as the trainer reads its score, after the loss
            assert torch.equal(inputs.token_nll(), target_nll(student.detach().flatten(0, 1), targets[0])[None])


def test_mix_runs_equal_ones_with_the_nll_and_kl_computed_apart(monkeypatch, one_thread):
    """Alone and in a batch of uneven documents (padded, masked targets: each token its own weight)."""
    config = OnlineConfig(**SMALL, method="locas", lr=2e-2, loss="mix", mix_alpha=0.3, teacher_window=32)
    model, documents = tiny_model("qwen3"), [stream(100, seed=4), stream(70, seed=5)]

    def runs():
        return [run_online(model, documents[0], config, progress=False)] + run_online_batch(
            model, documents, config, progress=False
        )

    fused = runs()
    alpha = config.mix_alpha
    monkeypatch.setitem(LOSSES, "mix", lambda inputs: alpha * ntp(inputs) + (1 - alpha) * sd(inputs))
    for fused_run, apart in zip(fused, runs(), strict=True):
        assert scores(fused_run) == pytest.approx(scores(apart), rel=1e-5)
        assert [r.loss for r in fused_run.records] == pytest.approx([r.loss for r in apart.records], rel=1e-5)
        for name, tensor in apart.memory.slot_tensors().items():
            torch.testing.assert_close(fused_run.memory.slot_tensors()[name], tensor, rtol=1e-4, atol=1e-6)
        assert apart.memory.down.abs().max() > 1e-3  # the memory trained: values start at zero
