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


def test_training_needs_an_attached_memory():
    locas_model = locas.LocasModel(tiny_model("llama"))
    with pytest.raises(ValueError, match="no memory attached"):
        train_on_windows(locas_model, torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4), steps=1)


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
