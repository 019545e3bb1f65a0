"""IAR components and adapters: orders of prediction, class dropout off while scoring,
export / load, the VAR worked example against a stand-in with the official signature,
one-line errors, network-call counts and batch invariance of the features."""

import textwrap

import pytest
import torch

from rsgm.components.iar import MaskedIAR, RasterIAR, ScaleIAR
from rsgm.components.iar_adapters import BuiltinIARTarget, VARTarget, export_builtin
from rsgm.errors import RSGMError
from rsgm.privacy.iar_features import IARFeatureConfig, extract_features

torch.manual_seed(0)
X = torch.rand(6, 1, 8, 8) * 2 - 1
Y = torch.arange(6) % 10


def test_raster_is_causal_and_scale_is_block_causal():
    m = RasterIAR(dim=16, depth=1).eval()
    t = m.tokenize(X)
    t2 = t.clone()
    t2[:, 10] = (t2[:, 10] + 1) % 17
    a, b = m.logits(t, Y), m.logits(t2, Y)
    assert torch.allclose(a[:, :11], b[:, :11]) and not torch.allclose(a[:, 11:], b[:, 11:])
    s = ScaleIAR(dim=16, depth=1).eval()
    t = s.tokenize(X)
    assert t.shape == (6, 85)
    t2 = t.clone()
    t2[:, 5 + 3] = (t2[:, 5 + 3] + 1) % 17  # a token of the 4x4 scale (positions 5..20)
    a, b = s.logits(t, Y), s.logits(t2, Y)
    assert torch.allclose(a[:, :21], b[:, :21]) and not torch.allclose(a[:, 21:], b[:, 21:])


def test_complete_keeps_prefix_and_decode_inverts_tokenize():
    for m in (RasterIAR(dim=16, depth=1).eval(), ScaleIAR(dim=16, depth=1).eval()):
        t = m.tokenize(X)
        out = m.complete(t[:, :5], Y)
        assert torch.equal(out[:, :5], t[:, :5]) and out.shape == t.shape
        x8 = ((X + 1) * 8).round() / 8 - 1
        assert torch.allclose(m.decode(m.tokenize(x8)), x8)


def test_class_dropout_only_in_training_loss():
    m = RasterIAR(dim=16, depth=1, cond_drop_prob=1.0).eval()
    t = m.tokenize(X)
    assert not torch.allclose(m.logits(t, Y), m.logits(t, torch.full_like(Y, 10)))
    assert torch.allclose(m.logits(t, Y), m.logits(t, Y))  # scoring is deterministic
    torch.manual_seed(1)
    l1 = m.loss(X, Y, train=True)  # every class dropped: the loss equals the null-class loss
    null_loss = torch.nn.functional.cross_entropy(m.logits(t, torch.full_like(Y, 10)).transpose(1, 2), t)
    assert torch.allclose(l1, null_loss)


def test_masked_token_losses_nan_outside_mask():
    m = MaskedIAR(dim=16, depth=1, head_width=16).eval()
    tok = m.tokenize(X)
    mask = m.random_mask(6, 0.95, generator=torch.Generator().manual_seed(0))
    assert int(mask.sum(1).unique()) == 15
    eps = torch.randn(3, 6, 16, 4)
    loss = m.token_losses(tok, Y, 500, mask, eps)
    assert torch.isnan(loss[~mask]).all() and torch.isfinite(loss[mask]).all()
    one = torch.stack([m.token_losses(tok, Y, 500, mask, eps[i:i + 1]) for i in range(3)]).mean(0)
    assert torch.allclose(loss[mask], one[mask], atol=1e-6)  # the mean over draws


def test_masked_defended_output_is_noise_on_the_clean_token_prediction():
    """Hand case: a head that predicts eps_hat = 0 returns x0_hat = x_t / sqrt(abar); the
    defended API adds n to x0_hat, so the attacker's loss is || (x_t - sqrt(abar) (x0_hat + n))
    / sqrt(1 - abar) - eps ||^2 averaged over coordinates and draws."""
    m = MaskedIAR(dim=16, depth=1, head_width=16).eval()
    torch.nn.init.zeros_(m.head.out.weight), torch.nn.init.zeros_(m.head.out.bias)  # eps_hat = 0
    tok = m.tokenize(X)
    mask = m.random_mask(6, 0.95, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    eps, n = torch.randn(3, 6, 16, 4, generator=g), 0.3 * torch.randn(3, 6, 16, 4, generator=g)
    ab = m.alphas_cumprod[500]
    x_t = ab.sqrt() * tok + (1 - ab).sqrt() * eps
    x0 = x_t / ab.sqrt() + n
    want = ((x_t - ab.sqrt() * x0) / (1 - ab).sqrt() - eps).pow(2).mean(-1).mean(0)
    got = m.token_losses(tok, Y, 500, mask, eps, token_noise=n)
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=1e-6)
    clean = m.token_losses(tok, Y, 500, mask, eps)
    torch.testing.assert_close(clean[mask], eps.pow(2).mean(-1).mean(0)[mask])
    torch.testing.assert_close(m.token_losses(tok, Y, 500, mask, eps, token_noise=torch.zeros_like(n))[mask], clean[mask])


def test_masked_mitigation_features_use_the_noise():
    """Features under token noise differ from the clean ones (they would be equal if the
    noise were not applied), grow closer as sigma shrinks, and cost two defended passes per sigma."""
    tgt = BuiltinIARTarget(model=MaskedIAR(dim=16, depth=1, head_width=16).eval())
    cfg = IARFeatureConfig(draws=8, token_noise=(1e-4, 1.0))
    out = extract_features(tgt, X, Y, torch.arange(6), cfg)
    clean, small, big = out["features"]["cond_loss"], out["noisy"][1e-4]["cond_loss"], out["noisy"][1.0]["cond_loss"]
    assert not torch.allclose(clean, big) and not torch.equal(clean, small)
    assert (small - clean).abs().max() < 1e-3 * (big - clean).abs().max()
    assert (big < clean).all()  # noise adds abar / (1 - abar) * sigma^2 to the expected loss: members look less member
    assert tgt.calls["forward"] == 2 * 6 and tgt.calls["forward_defended"] == 2 * 2 * 6
    with pytest.raises(ValueError, match="does not apply"):
        IARFeatureConfig(logit_noise=(1.0,)).noise_grid("masked")
    with pytest.raises(ValueError, match="does not apply"):
        IARFeatureConfig(token_noise=(1.0,)).noise_grid("token")


@pytest.mark.parametrize("cls", [RasterIAR, ScaleIAR, MaskedIAR])
def test_export_load_roundtrip_and_call_counts(tmp_path, cls):
    kw = {"dim": 16, "depth": 1} | ({"head_width": 16} if cls is MaskedIAR else {})
    m = cls(**kw).eval()
    export_builtin(m, tmp_path / "m", {"members": [0], "nonmembers": [1]})
    tgt = BuiltinIARTarget(str(tmp_path / "m")).load()
    cfg = IARFeatureConfig(draws=8, logit_noise=(0.5,) if m.kind == "token" else ())
    idx = torch.arange(6)
    out = extract_features(tgt, X, Y, idx, cfg)
    # at most two backbone passes per sample (conditional and null), whatever the draws
    assert tgt.calls["forward"] == 2 * len(X)
    # the same features when the batch is split (what DDP does)
    halves = [extract_features(tgt, X[s], Y[s], idx[s], cfg)["features"] for s in (slice(0, 2), slice(2, 6))]
    for name, v in out["features"].items():
        w = torch.cat([h[name] for h in halves])
        assert torch.allclose(v, w, equal_nan=True, atol=1e-9), name
    if m.kind == "token":
        with torch.no_grad():
            assert torch.allclose(tgt.logits(m.tokenize(X), Y), m.logits(m.tokenize(X), Y), atol=1e-5)


def test_missing_checkpoint_is_one_line_error(tmp_path):
    with pytest.raises(RSGMError) as e:
        BuiltinIARTarget(str(tmp_path / "nope"))
    assert "\n" not in str(e.value) and "rsgm fit" in str(e.value)
    with pytest.raises(RSGMError, match="VAR code folder"):
        VARTarget(str(tmp_path / "code"), "a.pth", "b.pth").load()


STANDIN = '''
import torch
from torch import nn

class _Quant(nn.Module):
    def __init__(self, V, C, pn):
        super().__init__()
        self.embedding, self.pn = nn.Embedding(V, C), pn
    def idxBl_to_var_input(self, gt_ms_idx_Bl):
        # official: continuous inputs of scales 2..K, shape (B, L - 1, Cvae)
        return torch.cat([self.embedding(i) for i in gt_ms_idx_Bl[1:]], 1)

class VQVAE(nn.Module):
    def __init__(self, V, Cvae, patch_nums):
        super().__init__()
        self.V, self.patch_nums = V, patch_nums
        self.quantize = _Quant(V, Cvae, patch_nums)
    def img_to_idxBl(self, inp_img_no_grad, v_patch_nums=None):
        x = inp_img_no_grad.mean(1, keepdim=True)
        return [((torch.nn.functional.adaptive_avg_pool2d(x, p) + 1) / 2 * (self.V - 1)).round().long().flatten(1) for p in self.patch_nums]
    def idxBl_to_img(self, ms_idx_Bl, same_shape, last_one=False):
        p = self.patch_nums[-1]
        return (ms_idx_Bl[-1].float() / (self.V - 1) * 2 - 1).view(-1, 1, p, p)

class VAR(nn.Module):
    def __init__(self, V, Cvae, num_classes, patch_nums, depth):
        super().__init__()
        self.num_classes, self.cond_drop_rate = num_classes, 0.1
        self.L = sum(p * p for p in patch_nums)
        self.cls = nn.Embedding(num_classes + 1, 8)
        self.inp = nn.Linear(Cvae, 8)
        self.head = nn.Linear(8, V)
    def forward(self, label_B, x_BLCv_wo_first_l):
        B = x_BLCv_wo_first_l.shape[0]
        # the official forward drops the class on every call, in eval mode too
        label_B = torch.where(torch.rand(B) < self.cond_drop_rate, self.num_classes, label_B)
        h = torch.cat([self.cls(label_B).unsqueeze(1), self.inp(x_BLCv_wo_first_l) + self.cls(label_B).unsqueeze(1)], 1)
        return self.head(torch.tanh(h))

def build_vae_var(V, Cvae, ch, share_quant_resi, device, patch_nums, num_classes, depth, shared_aln):
    return VQVAE(V, Cvae, patch_nums), VAR(V, Cvae, num_classes, patch_nums, depth)
'''


def test_var_worked_example_with_standin(tmp_path, monkeypatch):
    code = tmp_path / "VAR"
    (code / "models").mkdir(parents=True)
    (code / "models" / "__init__.py").write_text(textwrap.dedent(STANDIN))
    monkeypatch.syspath_prepend(str(code))
    import importlib
    import sys

    sys.modules.pop("models", None)
    models = importlib.import_module("models")
    pn = (1, 2, 4)
    vae, var = models.build_vae_var(V=17, Cvae=32, ch=160, share_quant_resi=4, device="cpu", patch_nums=pn, num_classes=10, depth=16, shared_aln=False)
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    torch.save(var.state_dict(), tmp_path / "var.pth")
    with pytest.raises(RSGMError, match="VAR transformer checkpoint"):
        VARTarget(str(code), str(tmp_path / "vae.pth"), str(tmp_path / "missing.pth")).load()
    tgt = VARTarget(str(code), str(tmp_path / "vae.pth"), str(tmp_path / "var.pth"), num_classes=10, patch_nums=pn, vocab_size=17).load()
    sys.modules.pop("models", None)
    assert tgt.var.cond_drop_rate == 0.0
    x = torch.rand(4, 3, 4, 4) * 2 - 1
    y = torch.arange(4)
    tok = tgt.tokenize(x)
    assert tok.shape == (4, 21)
    lg = tgt.logits(tok, y)
    assert lg.shape == (4, 21, 17) and torch.allclose(lg, tgt.logits(tok, y))  # no hidden class dropout
    out = extract_features(tgt, x, y, torch.arange(4), IARFeatureConfig())
    assert set(n.split("_")[0] for n in out["features"]) == {"cond", "cfg"}
    comp = tgt.complete(tok[:, :5], y)
    assert torch.equal(comp[:, :5], tok[:, :5]) and tgt.decode(comp).shape == (4, 1, 4, 4)
