"""ExpertSim's router losses and router against hand-computed values."""

import math

import pytest
import torch

from rsgm.components.router import Router, annealed_temperature
from rsgm.losses.routing import differentiation_loss, expert_mean_intensities, utilisation_loss


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


def test_differentiation_loss_skips_unused_experts():
    intensity = torch.tensor([10.0, 30.0, 5.0])
    assignment = torch.tensor([[1, 0, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.float)
    # expert 1 is unused: only the pair (7.5, 30) counts
    assert differentiation_loss(intensity, assignment).item() == pytest.approx(-(22.5**2))
    assert differentiation_loss(intensity, torch.tensor([[1.0, 0.0]] * 3)).item() == 0.0


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
