"""ExpertSim's router losses and router against hand-computed values."""

import inspect
import math

import pytest
import torch

from rsgm.components.router import Router, annealed_temperature
from rsgm.lightning_modules.expertsim import ExpertSim
from rsgm.losses.routing import (differentiation_loss, expert_loss_signal, expert_mean_intensities, rescale_intensity,
                                 utilisation_loss)


def test_utilisation_loss_is_negative_entropy_of_mean_gate():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    # mean gate (0.4, 0.4, 0.2): sum p log p
    expected = 2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2)
    assert utilisation_loss(probs, eps=0.0).item() == pytest.approx(expected, rel=1e-6)


def test_utilisation_loss_is_minimal_for_balanced_use():
    balanced = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    collapsed = torch.tensor([[1.0, 0.0, 0.0]] * 3)
    assert utilisation_loss(balanced).item() == pytest.approx(-math.log(3), rel=1e-6)
    assert utilisation_loss(collapsed).item() == pytest.approx(0.0, abs=1e-6)
    # Minimising it must move a collapsed router towards balance (entropy maximisation).
    logits = torch.tensor([[2.0, 0.0, 0.0]] * 4, requires_grad=True)
    utilisation_loss(logits.softmax(1)).backward()
    assert logits.grad[0, 0] > 0 and logits.grad[0, 1] < 0


def test_differentiation_loss_hand_computed():
    intensity = torch.tensor([10.0, 20.0, 100.0, 50.0, 70.0])
    assignment = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]], dtype=torch.float)
    # means 15, 100, 60: -( (15-100)^2 + (15-60)^2 + (100-60)^2 ) = -(7225 + 2025 + 1600)
    assert differentiation_loss(intensity, assignment).item() == pytest.approx(-10850.0)
    means, used = expert_mean_intensities(intensity, assignment)
    assert means.tolist() == [15.0, 100.0, 60.0] and used.all()


def test_share_weighted_differentiation_loss_is_between_expert_variance():
    intensity = torch.tensor([10.0, 20.0, 100.0, 50.0, 70.0])
    assignment = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]], dtype=torch.float)
    # shares 0.4, 0.2, 0.4 and means 15, 100, 60: 0.4*0.2*7225 + 0.4*0.4*2025 + 0.2*0.4*1600 = 1030,
    # the between-expert variance sum_i w_i (m_i - 50)^2 = 490 + 500 + 40.
    assert differentiation_loss(intensity, assignment, share_weighted=True).item() == pytest.approx(-1030.0)
    # An expert holding one bright sample out of B: eq. 5.7 credits it fully at any B, the
    # weighted form by its share, (B - 1) / B * 1 / B.
    for b in (4, 100):
        isolated = torch.nn.functional.one_hot(torch.tensor([0] * (b - 1) + [1]), 2).float()
        bright = torch.tensor([0.0] * (b - 1) + [1.0])
        assert differentiation_loss(bright, isolated).item() == pytest.approx(-1.0)
        assert differentiation_loss(bright, isolated, True).item() == pytest.approx(-(b - 1) / b**2)


def test_rescale_intensity_hand_computed():
    fake, real = torch.tensor([50.0, 150.0]), torch.tensor([100.0, 300.0])  # real mean 200
    assert rescale_intensity(fake, real, 10.0).tolist() == pytest.approx([2.5, 7.5])
    assert rescale_intensity(fake, real, None) is fake


def test_differentiation_loss_skips_unused_experts():
    intensity = torch.tensor([10.0, 30.0, 5.0])
    assignment = torch.tensor([[1, 0, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.float)
    # expert 1 is unused: only the pair (7.5, 30) counts
    assert differentiation_loss(intensity, assignment).item() == pytest.approx(-(22.5**2))
    assert differentiation_loss(intensity, torch.tensor([[1.0, 0.0]] * 3)).item() == 0.0


def test_expert_loss_signal_hand_computed():
    # Four samples: two on expert 0 (loss 3), one on expert 1 (loss 1), one on expert 2 (loss 2).
    soft = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]], requires_grad=True)
    hard = torch.nn.functional.one_hot(soft.detach().argmax(1), 3).float()
    gates = hard - soft.detach() + soft  # straight-through
    losses = torch.tensor([3.0, 1.0, 2.0])
    # Routed-sample mean loss (3 + 3 + 1 + 2) / 4 = 2.25; gradient (L_i - 2.25) / 4 on each routed gate.
    signal = expert_loss_signal(losses, gates)
    assert signal.item() == pytest.approx(0.0, abs=1e-7)
    signal.backward()
    expected = hard * torch.tensor([0.75, -1.25, -0.25]) / 4
    assert torch.allclose(soft.grad, expected)
    soft.grad = None
    expert_loss_signal(losses, gates, baseline=False).backward()
    assert torch.allclose(soft.grad, hard * losses / 4)
    with pytest.raises(ValueError, match="expert_losses"):
        expert_loss_signal(losses[:2], gates)


def test_expert_loss_signal_ignores_experts_without_samples():
    soft = torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1]], requires_grad=True)
    gates = torch.nn.functional.one_hot(soft.detach().argmax(1), 3).float() - soft.detach() + soft
    expert_loss_signal(torch.tensor([1.0, float("nan"), 5.0]), gates).backward()
    assert torch.equal(soft.grad, torch.zeros(2, 3))  # one used expert: every sample is at the mean


def test_router_shapes_and_straight_through_gradient():
    torch.manual_seed(0)
    router = Router(n_experts=4)
    assert [m.out_features for m in router.net if isinstance(m, torch.nn.Linear)] == [128, 64, 32, 4]
    cond = torch.randn(16, 9)
    gates, probs = router.route(cond, tau=1.0)
    assert torch.equal(gates.detach().sum(1), torch.ones(16)) and set(gates.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(probs.sum(1), torch.ones(16))
    (gates * torch.arange(4.0)).sum().backward()
    assert router.net[0].weight.grad.abs().sum() > 0
    assert router.assign(cond).shape == (16,)


def test_annealed_temperature():
    assert annealed_temperature(0.0) == pytest.approx(1.2)
    assert annealed_temperature(0.5) == pytest.approx(1.0)
    assert annealed_temperature(2.0) == pytest.approx(0.8)


def _train_router_on_known_intensities(lambda_util: float, steps: int = 300) -> tuple[list[float], list[float], float]:
    """A router trained by ExpertSim's default L_util and L_diff alone, on conditions whose
    photon sum is a known function of the first condition; returns the shares and mean
    photon sums of its experts on fresh conditions, and its mean top gate probability."""
    defaults = {k: v.default for k, v in inspect.signature(ExpertSim).parameters.items()}
    torch.manual_seed(0)
    router = Router(defaults["n_experts"])
    opt = torch.optim.Adam(router.parameters(), lr=1e-3, betas=(0.5, 0.999))

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        cond = torch.randn(n, 9)
        return cond, 100 * torch.exp(cond[:, 0])

    for _ in range(steps):
        cond, intensity = draw(128)
        gates, probs = router.route(cond, tau=1.0)
        scaled = rescale_intensity(intensity, intensity, defaults["diff_intensity_scale"])
        loss = (lambda_util * utilisation_loss(probs)
                + defaults["lambda_diff"] * differentiation_loss(scaled, gates, defaults["diff_share_weighted"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    cond, intensity = draw(4000)
    expert = router.assign(cond, generator=torch.Generator().manual_seed(0))
    shares = [(expert == i).float().mean().item() for i in range(router.n_experts)]
    means = [intensity[expert == i].mean().item() if (expert == i).any() else float("nan") for i in range(router.n_experts)]
    return shares, means, router(cond).softmax(1).max(1).values.mean().item()


def test_default_router_losses_sort_conditions_into_intensity_bands_and_util_prevents_collapse():
    shares, means, confidence = _train_router_on_known_intensities(lambda_util=0.01)
    assert min(shares) >= 0.10, f"routing collapsed: shares {shares}"
    assert confidence > 0.8, f"router stayed near uniform: mean top gate {confidence:.2f}"
    low, mid, high = sorted(means)
    assert mid > 1.5 * low and high > 1.5 * mid, f"experts do not see distinct intensity bands: {means}"
    # Without L_util (thesis Table 5.5.3), L_diff alone empties an expert.
    shares_no_util, _, _ = _train_router_on_known_intensities(lambda_util=0.0)
    assert min(shares_no_util) < 0.05, f"no collapse without L_util: shares {shares_no_util}"
