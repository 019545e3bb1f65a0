"""The fused inference form of the ZDC generator computes the eval-mode function of the
trained generator (BatchNorm folded, sub-pixel convolutions, channels-last), up to float
rounding, and follows the generator's weights as they change."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from rsgm.components.gan import CompiledForInference, ZDCGenerator
from rsgm.components.zdc_inference import FusedZDCGenerator, fold_batchnorm, transposed_weight, upsample_conv


def randomise_batchnorm(module: nn.Module, gen: torch.Generator) -> None:
    """Running statistics and affine parameters far from their initial (identity) values."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 2 + 0.2)
                m.weight.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.copy_(torch.randn(m.num_features, generator=gen))


def test_fold_batchnorm_matches_batchnorm_by_hand():
    bn = nn.BatchNorm1d(2, eps=0.0).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -2.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25]))
        bn.weight.copy_(torch.tensor([3.0, 1.0]))
        bn.bias.copy_(torch.tensor([0.5, 0.0]))
    weight, bias = torch.tensor([[1.0, 0.0], [2.0, 1.0]]), torch.tensor([0.0, 1.0])
    w, b = fold_batchnorm(weight, bias, bn)
    # channel 0: 3 * (x - 1) / 2 + 0.5 ; channel 1: (2 x0 + x1 + 1 + 2) / 0.5
    torch.testing.assert_close(w, torch.tensor([[1.5, 0.0], [4.0, 2.0]]))
    torch.testing.assert_close(b, torch.tensor([-1.0, 6.0]))
    x = torch.randn(5, 2)
    torch.testing.assert_close(F.linear(x, w, b), bn(F.linear(x, weight, bias)))


@pytest.mark.parametrize("shape", [(3, 4, 5, 7), (2, 1, 1, 1), (1, 3, 11, 11)])
def test_transposed_conv_is_upsample_then_conv(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    weight, bias = torch.randn(6, shape[1], 3, 3, generator=gen), torch.randn(6, generator=gen)
    expected = F.conv2d(F.interpolate(x, size=(2 * shape[2], 2 * shape[3]), mode="nearest"), weight, bias, padding=1)
    torch.testing.assert_close(upsample_conv(x, transposed_weight(weight), bias), expected, rtol=1e-5, atol=1e-5)


def test_transposed_weight_of_a_single_tap():
    """A kernel with one non-zero tap (row 2, column 0) lands on the transposed taps that use it:
    rows (w2, w1 + w2, w0 + w1, w0) -> taps 0 and 1; columns -> taps 2 and 3."""
    weight = torch.zeros(1, 1, 3, 3)
    weight[0, 0, 2, 0] = 1.0
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, :2, 2:] = 1.0
    torch.testing.assert_close(transposed_weight(weight), expected)


@pytest.mark.parametrize("detector", ["neutron", "proton"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_generator_matches_eval_generator(detector, channels_last):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    g = ZDCGenerator(detector, width=0.125)
    randomise_batchnorm(g, gen)
    g.eval()
    fused = FusedZDCGenerator(g, channels_last=channels_last)
    kinds = [c.kind for c in fused.convs]
    assert kinds.count("transposed") == (2 if detector == "neutron" else 1)  # proton's 40x20 -> 56x30 is not x2
    z, c = torch.randn(33, 10, generator=gen), torch.randn(33, 9, generator=gen)
    with torch.inference_mode():
        expected = g(z, c)
        got = fused(z, c)
    assert got.shape == expected.shape and got.is_contiguous()
    assert expected.std() > 0.01  # not a clipped constant
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def train_steps_then_compare(g: ZDCGenerator, runner: CompiledForInference) -> None:
    """Two SGD steps in training mode (moving weights and BatchNorm statistics), each followed
    by generation through ``runner``, which must match the eval-mode generator."""
    with torch.no_grad():
        g.convs[-2].bias.fill_(2.0)  # outputs off the clip at 0, so the comparison is not of zeros
    z, c = torch.randn(16, 10), torch.randn(16, 9)
    opt = torch.optim.SGD(g.parameters(), lr=0.5)
    for _ in range(2):
        g.train()
        loss = g(z, c).mean() + g.convs[1].weight.square().sum()  # moves weights and BatchNorm statistics
        opt.zero_grad()
        loss.backward()
        opt.step()
        g.eval()
        with torch.inference_mode():
            expected = g(z, c)
            assert expected.std() > 0.01
            torch.testing.assert_close(runner(z, c), expected, rtol=1e-4, atol=1e-5)


def test_fused_form_follows_weight_updates_and_generation_uses_it(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    torch.manual_seed(2)
    g = ZDCGenerator(width=0.125)
    runner = CompiledForInference(g, log=lambda message: None)
    train_steps_then_compare(g, runner)
    assert isinstance(runner.form, FusedZDCGenerator)
    assert g.state_dict().keys() == ZDCGenerator(width=0.125).state_dict().keys()  # the form is never checkpointed


def test_fused_inference_off_compiles_the_module_itself():
    g = ZDCGenerator(width=0.125, fused_inference=False)
    assert g.inference_form() is g
    assert isinstance(ZDCGenerator(width=0.125).inference_form(), FusedZDCGenerator)


def test_bfloat16_form_is_close_but_opt_in():
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    g = ZDCGenerator(width=0.125)
    randomise_batchnorm(g, gen)
    with torch.no_grad():
        g.convs[-2].bias.fill_(2.0)  # outputs away from the clip at 0
    g.eval()
    z, c = torch.randn(64, 10, generator=gen), torch.randn(64, 9, generator=gen)
    with torch.inference_mode():
        expected = g(z, c)
        got = ZDCGenerator(width=0.125, inference_dtype="bfloat16").inference_form().__class__(g, dtype=torch.bfloat16)(z, c)
    assert got.dtype == torch.float32
    deviation = (got - expected).abs().max().item()
    assert 0 < deviation < 0.05  # bfloat16 rounding (about 3 significant digits), in log1p photons
    assert ZDCGenerator(width=0.125).inference_form().dtype == torch.float32
    assert ZDCGenerator(width=0.125, inference_dtype="bfloat16").inference_form().dtype == torch.bfloat16


@pytest.mark.slow
def test_compiled_fused_form_follows_weight_updates():
    torch.manual_seed(4)
    g = ZDCGenerator(width=0.125)
    runner = CompiledForInference(g, log=lambda message: None)
    train_steps_then_compare(g, runner)
    if runner.failed:
        pytest.skip("torch.compile is unavailable on this machine (eager fallback was used)")
