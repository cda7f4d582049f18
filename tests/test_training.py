import pytest
import torch
from conftest import tiny_model

import locas
from locas.data import split_windows
from locas.training import train_on_windows


@pytest.mark.parametrize("family_name", ["qwen3", "gpt_neox"])
def test_ntp_steps_lower_the_loss_on_the_memorized_text_and_keep_the_norm_bound(family_name):
    model = tiny_model(family_name)
    backbone_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    stream = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(0))
    input_ids, attention_mask = split_windows(stream, window=16, pad_id=0)
    assert input_ids.shape == (3, 16) and attention_mask[2].tolist() == [1] * 8 + [0] * 8

    locas_model = locas.attach(model, width=8)
    memory = locas_model.memorize(input_ids, attention_mask=attention_mask, keep_top=8)
    memory.tau.mul_(20)  # a small random model needs a louder memory to move in a few steps
    before = locas_model.compute_nll(input_ids, attention_mask=attention_mask).sum()
    losses = train_on_windows(locas_model, input_ids, attention_mask, steps=8, lr=3e-2, progress=False)
    after = locas_model.compute_nll(input_ids, attention_mask=attention_mask).sum()
    predicted = attention_mask[:, 1:].sum()
    assert losses[0] == pytest.approx((before / predicted).item(), rel=1e-5)  # first loss is before any update
    assert after < 0.9 * before
    for tensor in memory.slot_tensors().values():
        assert tensor.norm(dim=-1).max() <= 1 + 1e-5
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, backbone_state[name]), name


def test_training_needs_an_attached_memory_and_says_how_to_attach_one():
    model = tiny_model("llama")
    locas_model = locas.LocasModel(model)
    ids = torch.zeros(1, 4, dtype=torch.long)
    memory = locas.memorize(locas_model, ids, keep_top=4)  # the function returns a memory, attaching none
    with pytest.raises(ValueError, match=r"no memory attached: .*memorize\(.*attach_memory\(memory\)"):
        train_on_windows(locas_model, ids, torch.ones(1, 4), steps=1)
    locas_model.attach_memory(memory)
    assert len(train_on_windows(locas_model, ids, torch.ones(1, 4), steps=1, progress=False)) == 1


def test_windows_without_a_prediction_are_refused_before_any_step():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    locas_model = locas.attach(model, width=8)
    memory = locas_model.memorize(ids, keep_top=8)
    before = {name: tensor.detach().clone() for name, tensor in memory.slot_tensors().items()}
    for input_ids, attention_mask in [(ids, torch.zeros_like(ids)), (ids[:, :1], torch.ones_like(ids[:, :1]))]:
        with pytest.raises(ValueError, match="no token to predict"):
            train_on_windows(locas_model, input_ids, attention_mask, steps=1, progress=False)
    for name, tensor in memory.slot_tensors().items():  # no step ran (a step on loss/0 is NaN)
        assert torch.equal(tensor, before[name]), name


def test_training_checks_its_inputs_and_reads_no_mask_as_all_real_tokens():
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    losses = []
    for mask in (torch.ones_like(ids), None):
        locas_model = locas.attach(tiny_model("llama"), width=8)
        locas_model.memorize(ids, keep_top=8)
        losses.append(train_on_windows(locas_model, ids, mask, steps=2, lr=3e-2, progress=False))
    assert losses[1] == losses[0]
    with pytest.raises(ValueError, match=r"shape \(batch, seq\).*unsqueeze\(0\)"):
        train_on_windows(locas_model, ids[0], None, steps=1, progress=False)
    with pytest.raises(ValueError, match="dtype torch.long, got torch.float32"):
        train_on_windows(locas_model, ids.float(), None, steps=1, progress=False)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        train_on_windows(locas_model, ids, torch.ones(2, 7), steps=1, progress=False)


def test_a_per_sequence_memory_trains_each_memory_on_its_own_window():
    """With a memory of batch B and B windows, memory r is served and trained on window r. The loss is the sum
    over windows divided by all windows' predicted tokens, so memory r's gradient is its window's own times a
    positive constant, and AdamW's update does not depend on that scale (but for its epsilon): a step gives
    each memory the step it takes trained alone on its window. (Over several steps Adam magnifies those
    epsilon-sized differences where a gradient is near 0: the memories then stay close, not equal.)"""
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # windows of unequal lengths: each window's gradient is scaled by another constant
    locas_model = locas.attach(tiny_model("qwen3"), width=8)
    memory = locas_model.memorize(ids, attention_mask=mask, keep_top=8, per_sequence=True)
    memory.tau.mul_(20)  # a louder memory moves the loss in a few steps
    first = [memory.select(row) for row in range(2)]  # copies
    before = locas_model.compute_nll(ids, attention_mask=mask).sum(dim=1)
    (together,) = train_on_windows(locas_model, ids, mask, steps=1, lr=3e-2, progress=False)
    alone_losses = []
    for row in range(2):
        alone = locas_model.attach_memory(first[row].select(0))  # trained in place
        alone_losses += train_on_windows(locas_model, ids[row : row + 1], mask[row : row + 1], 1, 3e-2, False)
        assert not torch.equal(alone.down, first[row].down)
        for name, tensor in alone.slot_tensors().items():
            torch.testing.assert_close(memory.select(row).slot_tensors()[name], tensor.detach(), rtol=0, atol=1e-5)
    counts = mask[:, 1:].sum(dim=1)
    assert together == pytest.approx(sum(alone_losses[row] * counts[row].item() for row in range(2)) / counts.sum())
    locas_model.attach_memory(memory)
    train_on_windows(locas_model, ids, mask, steps=3, lr=3e-2, progress=False)
    after = locas_model.compute_nll(ids, attention_mask=mask).sum(dim=1)
    assert (after < before).all()
    with pytest.raises(ValueError, match="a batch of 2 memories, but there are 3 windows"):
        train_on_windows(locas_model, torch.cat([ids, ids[:1]]), None, steps=1, progress=False)


def test_split_windows_refuses_too_little():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        split_windows(torch.tensor([5]), window=8)
    with pytest.raises(ValueError, match="window must be at least 2"):
        split_windows(torch.arange(10), window=1)


def test_the_config_names_every_token_loss() -> None:
    """The CLI's --loss choices come from `training.config` (no torch); the losses themselves from `LOSSES`."""
    from locas.training.config import TOKEN_LOSSES
    from locas.training.losses import LOSSES

    assert tuple(LOSSES) == TOKEN_LOSSES
