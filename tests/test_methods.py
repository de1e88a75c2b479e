"""Loss functions against values worked out by hand on fixed tensors."""

import math

import pytest
import torch

from diffalign.methods import METHODS, PairLosses
from diffalign.methods.dpo import DPOConfig, dpo_loss
from diffalign.methods.mapo import MaPOConfig, mapo_loss


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x))


# Two pairs. Pair 0: the policy lowered the winner's loss by 0.0002 relative to the reference and left the
# loser alone; pair 1: the policy raised the winner's loss by 0.0001 and lowered the loser's by 0.0001.
MODEL_W = torch.tensor([0.1000, 0.2001])
MODEL_L = torch.tensor([0.3000, 0.3999])
REF_W = torch.tensor([0.1002, 0.2000])
REF_L = torch.tensor([0.3000, 0.4000])


def test_dpo_sigmoid_matches_hand_computation():
    # inside = -beta/2 * [(Lw - Rw) - (Ll - Rl)]
    # pair 0: -(2500) * [(-0.0002) - 0]      = +0.5
    # pair 1: -(2500) * [(+0.0001) - (-0.0001)] = -0.5
    out = dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=5000, loss_type="sigmoid")
    expected = -(_log_sigmoid(0.5) + _log_sigmoid(-0.5)) / 2  # = (0.474077 + 0.974077) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-3)
    assert out.loss.item() == pytest.approx(0.724077, abs=2e-3)
    assert out.implicit_acc.item() == 0.5
    assert out.reward_margin.item() == pytest.approx(0.0, abs=2e-3)


def test_dpo_sigmoid_equals_diffusers_form():
    # diffusers' script: -logsigmoid(beta' * (ref_diff - model_diff)) with beta' = beta / 2
    out = dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=5000)
    model_diff, ref_diff = MODEL_W - MODEL_L, REF_W - REF_L
    assert out.loss.item() == pytest.approx(
        (-torch.nn.functional.logsigmoid(2500 * (ref_diff - model_diff))).mean().item()
    )


def test_dpo_hinge_and_ipo():
    hinge = dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=5000, loss_type="hinge")
    # relu(1 - 0.5) = 0.5 ; relu(1 + 0.5) = 1.5 ; mean = 1.0
    assert hinge.loss.item() == pytest.approx(1.0, abs=5e-3)
    ipo = dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=0.5, loss_type="ipo")
    # logits = ref_diff - model_diff = [+0.0002, -0.0002]; target 1/(2*0.5) = 1
    expected = ((0.0002 - 1) ** 2 + (-0.0002 - 1) ** 2) / 2
    assert ipo.loss.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, loss_type="nope")


def test_dpo_at_the_reference_is_log_two_and_gradient_prefers_winner():
    w = torch.tensor([0.5], requires_grad=True)
    l_ = torch.tensor([0.5], requires_grad=True)
    out = dpo_loss(w, l_, torch.tensor([0.5]), torch.tensor([0.5]), beta=10)
    assert out.loss.item() == pytest.approx(math.log(2))
    assert out.implicit_acc.item() == 0.0  # ties do not count as correct
    out.loss.backward()
    # d loss / d Lw = beta/2 * sigmoid(-0) = 2.5 > 0 (lower the winner's loss); opposite for the loser
    assert w.grad.item() == pytest.approx(2.5)
    assert l_.grad.item() == pytest.approx(-2.5)


def test_mapo_matches_hand_computation():
    # phi_s(l) = s l / (exp(s l) - 1), s = 0.5
    w, l_ = torch.tensor([0.2, 0.4]), torch.tensor([0.4, 0.2])
    phi = lambda x: 0.5 * x / math.expm1(0.5 * x)  # noqa: E731
    # phi(0.2) = 0.1 / (e^0.1 - 1) = 0.1 / 0.1051709 = 0.950833 ; phi(0.4) = 0.2 / (e^0.2 - 1) = 0.903331
    assert phi(0.2) == pytest.approx(0.950833, abs=1e-6)
    assert phi(0.4) == pytest.approx(0.903331, abs=1e-6)
    margin0 = 10 * (phi(0.2) - phi(0.4))  # T = 10: +0.47502
    margin1 = -margin0
    expected = (0.2 + 0.4) / 2 - 0.1 * (_log_sigmoid(margin0) + _log_sigmoid(margin1)) / 2
    out = mapo_loss(w, l_, beta=0.1, snr_value=0.5, num_train_timesteps=10)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.implicit_acc.item() == 0.5
    assert out.reward_margin.item() == pytest.approx(0.0, abs=1e-6)


def test_mapo_has_no_reference_and_beta_zero_is_plain_sft_on_winners():
    w, l_ = torch.tensor([0.3, 0.1]), torch.tensor([0.2, 0.9])
    assert mapo_loss(w, l_, beta=0.0).loss.item() == pytest.approx(0.2)
    assert METHODS["mapo"].needs_reference is False
    assert METHODS["dpo"].needs_reference is True


def test_registry_dispatch_uses_config_values():
    pair = PairLosses(MODEL_W, MODEL_L, REF_W, REF_L, num_train_timesteps=1000)
    dpo = METHODS["dpo"].pair_loss(DPOConfig(beta=5000), pair)
    assert dpo.loss.item() == pytest.approx(dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=5000).loss.item())
    mapo = METHODS["mapo"].pair_loss(MaPOConfig(beta=0.2, snr_value=0.5), pair)
    assert mapo.loss.item() == pytest.approx(
        mapo_loss(MODEL_W, MODEL_L, beta=0.2, snr_value=0.5, num_train_timesteps=1000).loss.item())
