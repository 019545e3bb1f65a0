"""Chapter 8 additions: CLiD features, the PIA norm, the set-level max-score MIA (Table
8.5.1), MIAs on the DI task (App. C.19), CDI's ROC over alpha (App. C.18), the |U|/|P|
imbalance study (Table C.12.1) and the feature-set ablation spec (Fig. 8.5.2)."""

import json
import math

import pytest
import torch
from torch import nn

from rsgm.callbacks.dataset_inference import DatasetInference
from rsgm.components.diffusion_adapters import DiffusionTarget
from rsgm.errors import RSGMError
from rsgm.privacy import cdi_extras as X
from rsgm.privacy import stats as S
from rsgm.privacy.diffusion_features import DiffusionFeatureExtractor, FeatureConfig, minimum_rows_per_sample, sample_noise


class CondTarget(DiffusionTarget):
    """Smooth class-conditional eps-predictor; class 10 is the null class."""

    def __init__(self, conditional: bool = True) -> None:
        torch.manual_seed(0)
        super().__init__(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0))
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 1, 3, padding=1)
        self.emb = nn.Embedding(11, 4)
        self.conditional = conditional
        self.double().freeze()

    def null_cond(self, batch_size):
        return torch.full((batch_size,), 10, dtype=torch.long) if self.conditional else None

    def eps(self, z_t, t, cond):
        h = self.conv(z_t) * (1 + t.double().view(-1, 1, 1, 1) / 500)
        if cond is not None:
            h = h + self.emb(cond).view(-1, 4, 1, 1)
        return self.out(torch.tanh(h))


def one(target, z, t, c):
    return target.eps(z.unsqueeze(0), torch.tensor([t]), None if c is None else c.view(1))[0]


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 1, 6, 6, generator=g, dtype=torch.float64) * 2 - 1
    return x, torch.randint(0, 10, (5,), generator=g), torch.tensor([4, 9, 0, 17, 3])


def test_clid_matches_per_sample_reference(batch):
    x, y, index = batch
    target = CondTarget()
    cfg = FeatureConfig(features=["clid"], clid_timesteps=[0, 400, 900], clid_draws=2, seed=7)
    ext = DiffusionFeatureExtractor(cfg)
    feats = ext(target, x, y, index)
    assert ext.names == ["clid_t0", "clid_t400", "clid_t900"]
    a = target.alphas_cumprod.double()
    null = torch.tensor(10)
    for i in range(5):
        noise = sample_noise(index[i:i + 1], (6, 1, 6, 6), 7, 6)[0].double()
        for j, t in enumerate(cfg.clid_timesteps):
            ref = 0.0
            for r in range(2):
                e = noise[j * 2 + r]
                zt = a[t].sqrt() * x[i] + (1 - a[t]).sqrt() * e
                ref += float(((e - one(target, zt, t, y[i])) ** 2).sum() - ((e - one(target, zt, t, null)) ** 2).sum()) / 2
            assert float(feats[i, j]) == pytest.approx(ref, rel=1e-6, abs=1e-9)
    assert ext.rows_per_sample["clid"] == minimum_rows_per_sample(cfg)["clid"] == 12


def test_clid_needs_a_conditional_target(batch):
    x, y, index = batch
    ext = DiffusionFeatureExtractor(FeatureConfig(features=["clid"], clid_timesteps=[100]))
    with pytest.raises(RSGMError, match="conditional target"):
        ext(CondTarget(conditional=False), x, y, index)
    with pytest.raises(RSGMError, match="conditional target"):
        ext(CondTarget(), x, None, index)


def test_pia_norm_defaults_to_the_thesis_p5_and_l2_is_an_option(batch):
    x, y, index = batch
    target = CondTarget()
    assert FeatureConfig().pia_p == 5.0
    five = DiffusionFeatureExtractor(FeatureConfig(features=["pia"]))(target, x, y, index)[:, 0]
    two = DiffusionFeatureExtractor(FeatureConfig(features=["pia"], pia_p=2.0))(target, x, y, index)[:, 0]
    a, t = target.alphas_cumprod.double(), 200
    for i in range(5):
        e0 = one(target, x[i], 0, y[i])
        d = e0 - one(target, a[t].sqrt() * x[i] + (1 - a[t]).sqrt() * e0, t, y[i])
        assert float(five[i]) == pytest.approx(float((d.abs() ** 5).sum() ** 0.2), rel=1e-6)
        assert float(two[i]) == pytest.approx(float(d.norm()), rel=1e-6)
    with pytest.raises(ValueError, match="pia_p"):
        FeatureConfig(pia_p=0)


def test_set_max_and_threshold_hand_cases():
    s = torch.tensor([1.0, 5.0, 3.0])
    assert X.set_max_scores(s, 3, 4, 0).tolist() == [5.0] * 4  # the whole pool: always its max
    m = X.set_max_scores(torch.arange(10.0), 2, 500, 0)
    # max of 2 distinct draws from 0..9: P(max = 9) = 1 - C(9,2)/C(10,2) = 0.2
    assert abs(float((m == 9).double().mean()) - 0.2) < 0.06 and float(m.min()) >= 1
    # k = ceil((n + 1)(1 - a)): n = 199 -> k = 198, the value 197, one calibration negative above;
    # n = 100 -> k = 100, nothing above (taking 98 would give a fresh negative 2/101 > 1 %).
    assert X.threshold_at_fpr(torch.arange(199.0), 0.01) == 197.0
    assert X.threshold_at_fpr(torch.arange(100.0), 0.01) == 99.0
    assert X.threshold_at_fpr(torch.arange(100.0), 0.0) == float("inf")
    with pytest.raises(RSGMError, match="cannot be drawn"):
        X.set_max_scores(s, 4, 1, 0)


def test_set_level_mia_separates_and_stays_calibrated_on_null():
    g = torch.Generator().manual_seed(0)
    members, nonmembers = torch.randn(300, generator=g) + 8, torch.randn(1500, generator=g)
    sep = X.set_level_mia(members, nonmembers, 10, 1000, 0.01, seed=1)
    assert sep["tpr_at_fpr"] == 1.0 and sep["auc"] == 1.0 and sep["calibrated_tpr"] == 1.0
    # Null: both from one distribution. The threshold fixed on calibration sets keeps the
    # measured FPR on fresh sets inside the binomial interval of 1 %.
    null = X.set_level_mia(torch.randn(1500, generator=g), nonmembers, 10, 1000, 0.01, seed=2)
    assert null["calibrated_fpr_within"] and null["calibrated_fpr"] <= S.binomial_upper(1000, 0.01) / 1000
    assert 0.4 < null["auc"] < 0.6 and null["tpr_at_fpr"] < 0.05


def test_mia_on_di_uses_minus_feature_and_the_max_rule():
    names = ["dl", "gm_t0"]
    members = torch.tensor([[0.0, 1.0]] * 20)  # members: low loss (lower = member)
    nonmembers = torch.cat([torch.tensor([[1.0, 1.0]] * 39), torch.tensor([[-5.0, 1.0]])])
    rows = X.mia_on_di(names, members, nonmembers, [5, 50], n_sets=200, seed=0)
    assert [r["method"] for r in rows] == ["dl"] and rows[0]["set_size"] == 5  # 50 > pool: skipped
    # A non-member set wins the max rule whenever it holds the single outlier (-(-5) = 5 > 0).
    r = rows[0]
    p_outlier = 5 / 40
    assert r["tpr_at_fpr"] == 0.0 and abs(r["auc"] - (1 - p_outlier)) < 0.07
    with pytest.raises(RSGMError, match="not among"):
        X.mia_on_di(names, members, nonmembers, [5], features=["pia"])


def test_cdi_alpha_roc_hand_case():
    pm = torch.tensor([0.001, 0.02, 0.3, 0.9])
    pn = torch.tensor([0.005, 0.5, 0.6, 0.95])
    rows = X.cdi_alpha_roc(pm, pn, [0.0, 0.01, 0.5, 1.0])
    assert [r["tpr"] for r in rows] == [0.0, 0.25, 0.75, 1.0]
    assert [r["fpr_measured"] for r in rows] == [0.0, 0.25, 0.25, 1.0]
    fpr, tpr = X.pvalue_roc(pm, pn)
    # AUC = P(p_member < p_null) over the 16 pairs: 4 + 3 + 3 + 1 = 11 (no ties)
    assert float(torch.trapezoid(tpr, fpr)) == pytest.approx(11 / 16)


def test_imbalance_study_and_u_ratio():
    g = torch.Generator().manual_seed(0)
    members, nonmembers = torch.randn(200, 2, generator=g) + torch.tensor([1.5, 0.0]), torch.randn(400, 2, generator=g)
    rows = X.imbalance_study(members, nonmembers, [1.0, 0.25], [10, 20, 40, 80], trials=30)
    assert [r["u_ratio"] for r in rows] == [1.0, 0.25]
    full, quarter = rows
    assert full["min_P"] is not None and full["n_u_at_min_P"] == full["min_P"]
    assert quarter["min_P"] is None or quarter["min_P"] >= full["min_P"]
    same = X.imbalance_study(torch.randn(200, 2, generator=g), nonmembers, [1.0], [10, 20, 40], trials=30)
    assert same[0]["min_P"] is None and same[0]["largest_P_tried"] == 40
    with pytest.raises(RSGMError, match="positive"):
        X.imbalance_study(members, nonmembers, [0.0], [10])


def test_ablation_sets_spec():
    names = ["dl", "secmi", "pia", "pian", "gm_t0", "gm_t100", "ml_t0", "no_loss", "no_delta"]
    access = {n: ("white" if n[:2] in ("gm", "no") else "gray") for n in names}
    default = dict(X.ablation_sets(names, access=access))
    assert list(default) == ["existing", "gm", "ml", "no", "existing+gm", "existing+ml", "existing+no", "all", "all_gray_box"]
    assert default["existing+gm"] == [0, 1, 2, 3, 4, 5] and default["all_gray_box"] == [0, 1, 2, 3, 6]
    sets = dict(X.ablation_sets(names, ["singles", "existing_singles", "pairs", "triples", "gm+no"], access=access))
    units = 4  # existing, gm, ml, no
    assert sum("+" in k and k.count("+") == 1 for k in sets) == math.comb(units, 2)  # gm+no is one of the pairs
    assert sum(k.count("+") == 2 for k in sets) == math.comb(units, 3)
    assert sets["pia"] == [2] and sets["ml+no"] == [6, 7, 8] and sets["existing+gm+ml"] == [0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(RSGMError, match="neither"):
        X.ablation_sets(names, ["clid"])


def test_callback_runs_the_configured_studies(tmp_path):
    g = torch.Generator().manual_seed(0)
    names = ["dl", "pia", "gm_t0", "ml_t0"]
    F = torch.randn(260, 4, generator=g, dtype=torch.float64)
    F[:60, :2] -= 1.0  # 60 members with lower dl / pia
    res = {"names": names, "features": F, "is_member": (torch.arange(260) < 60).long(), "in_suspect": (torch.arange(260) < 60).long(),
           "index": torch.arange(260), "access": {"dl": "gray", "pia": "gray", "gm_t0": "white", "ml_t0": "gray"}}
    cb = DatasetInference(trials=20, null_trials=50, contamination_ratios=[], ablation_trials=10, sizes=[10, 20, 40],
                          ablation_sets=["singles", "pairs", "dl"], u_ratios=[1.0, 0.5], set_level_sizes=[10],
                          roc_sizes=[10, 20], study_sets=100)
    summary, tables = cb.run(res)
    labels = [r["features"] for r in tables["ablation"]]
    assert labels == ["existing", "gm", "ml", "existing+gm", "existing+ml", "gm+ml", "dl"]
    assert [r["u_ratio"] for r in tables["imbalance"]] == [1.0, 0.5] and "min_P[U/P=0.5]" in summary
    (sl,) = tables["set_level"]
    assert sl["n_p"] == 10 and 0 <= sl["set_level_tpr"] <= 1 and 0 <= sl["cdi_tpr_power"] <= 1
    methods = {(r["method"], r["set_size"]) for r in tables["di_roc"]}
    assert methods == {("cdi", 10), ("dl", 10), ("pia", 10), ("cdi", 20), ("dl", 20), ("pia", 20)}
    assert len(tables["alpha_roc"]) == 2 * 101
    cb.save(tmp_path, summary, tables)
    for name in ("imbalance", "set_level", "di_roc", "alpha_roc", "ablation"):
        assert (tmp_path / f"{name}.csv").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["min_P[U/P=1]"] == summary["min_P[U/P=1]"]


@pytest.mark.parametrize("kwargs,match", [({"trials": -5}, "trials must be at least 1, got -5"),
                                          ({"null_trials": 0}, "null_trials must be at least 1"),
                                          ({"k": 1}, "k must be at least 2"),
                                          ({"permutations": -1}, "permutations must be at least 0"),
                                          ({"alpha": 1.5}, "0 < alpha < 1"),
                                          ({"contamination_ratios": [0.5, 1.2]}, r"\[1.2\]"),
                                          ({"sizes": [10, 0]}, r"\[0\]")])
def test_dataset_inference_options_are_checked_in_one_line(kwargs, match):
    with pytest.raises(RSGMError, match=match):
        DatasetInference(**kwargs)
