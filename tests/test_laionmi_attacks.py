"""LAION-mi attack chains, subset metrics, classifier attacks, the SD adapter and the CLI run."""

import os

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from rsgm.components.diffusion_adapters import DiffusionTarget
from rsgm.metrics.laionmi import auc_columns, classifier_attack, subset_metrics, threshold_table, tpr_at_fpr_columns
from rsgm.metrics.membership import tpr_at_fpr
from rsgm.privacy.laionmi_attacks import (ChainConfig, attack_methods, chain_signals, ddim_sample, guided_eps,
                                          method_signals, signal_names)

AB = torch.linspace(0.9999, 0.01, 1000)


class Oracle(DiffusionTarget):
    """eps(z_t, t) = the noise that turns z_star into z_t: a model that has memorised z_star."""

    def __init__(self, z_star):
        super().__init__(AB)
        self.z_star = z_star
        self.calls = []

    def eps(self, z_t, t, cond):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        self.calls.append((t.clone(), z_t.clone()))
        return (z_t - a.sqrt() * self.z_star[: len(z_t)]) / (1 - a).sqrt()


def _cfg(**kw):
    return ChainConfig(passes=1, **kw)


def test_memorised_sample_has_zero_signals_along_every_iterative_chain():
    z_star = torch.randn(2, 2, 4, 4)
    target = Oracle(z_star.repeat(2, 1, 1, 1))  # CFG doubles the batch
    idx = torch.arange(2)
    y = torch.zeros(2, 3)
    s = chain_signals(target, attack_methods()["partial_denoising"], z_star, z_star, y, y, idx, _cfg())
    assert s.shape == (2, 26, 3)
    assert s.abs().max() < 1e-6  # the DDIM step keeps the chain on the memorised trajectory
    # Chains whose start level differs from their first timestep (as specified): the clean latent
    # is still recovered at every step, but the model-loss target is not the noise the UNet sees.
    for name in ("reversed_denoising", "full_denoising_start_300", "short_denoising_start_300"):
        m = attack_methods()[name]
        s = chain_signals(target, m, z_star, z_star, y, y, idx, _cfg())
        assert s.shape == (2, len(m.timesteps), 3)
        assert s[..., 1:].abs().max() < 1e-4 and (s[:, 0, 0] > 1e-2).all(), name
    # A sample the model never saw: every signal is positive.
    other = torch.randn(2, 2, 4, 4)
    s = chain_signals(target, attack_methods()["partial_denoising"], other, other, y, y, idx, _cfg())
    assert (s > 1e-3).all()


def test_wrong_start_breaks_the_trajectory_only_where_it_should():
    z_star = torch.randn(1, 2, 4, 4)
    target = Oracle(z_star.repeat(2, 1, 1, 1))
    y = torch.zeros(1, 3)
    s = chain_signals(target, attack_methods()["partial_denoising_wrong_start"], z_star, z_star, y, y, torch.arange(1), _cfg())
    # The input is noised at level 100 but the UNet is told t = 300: the model-loss target is the
    # starting noise, which the oracle no longer recovers, while the clean latent is still exact.
    assert s[0, 0, 0] > 1e-2 and s[0, 0, 1] < 1e-6


def test_reversed_noising_levels_and_fresh_noise():
    z = torch.zeros(1, 1, 8, 8)

    class Zero(DiffusionTarget):
        def __init__(self):
            super().__init__(AB)
            self.inputs = []

        def eps(self, z_t, t, cond):
            self.inputs.append((int(t[0]), float(z_t[:1].pow(2).mean())))
            return torch.zeros_like(z_t)

    target = Zero()
    m = attack_methods()["reversed_noising"]
    assert m.guidance == 100.0 and not m.iterative
    chain_signals(target, m, z, z, torch.zeros(1, 2), torch.zeros(1, 2), torch.arange(1), _cfg())
    seen = dict(target.inputs)
    assert list(seen) == list(range(900, -1, -100))
    # UNet step t sees a copy of z noised at level 900 - t: its power is 1 - abar_{900-t}.
    for t, power in seen.items():
        assert abs(power - float(1 - AB[900 - t])) < 0.6 * float(1 - AB[900 - t]) + 1e-3


def test_guidance_and_pass_averaging():
    class Lin(DiffusionTarget):
        def __init__(self):
            super().__init__(AB)

        def eps(self, z_t, t, cond):
            return z_t * cond.view(-1, 1, 1, 1)

    target = Lin()
    z, t = torch.randn(3, 1, 2, 2), torch.tensor([5, 6, 7])
    c, u = torch.full((3,), 2.0), torch.full((3,), 0.5)
    torch.testing.assert_close(guided_eps(target, z, t, c, u, 7.5), z * 0.5 + 7.5 * (z * 2 - z * 0.5))
    torch.testing.assert_close(guided_eps(target, z, t, c, u, None), z * 2)
    m = attack_methods()["baseline_loss"]
    cfg = ChainConfig(passes=3)
    passes = [chain_signals(target, m, z, z, c, u, torch.arange(3), cfg, p) for p in range(3)]
    assert not torch.allclose(passes[0], passes[1])
    torch.testing.assert_close(method_signals(target, m, z, z, c, u, torch.arange(3), cfg), torch.stack(passes).mean(0))
    # A sample's signals do not depend on its batch.
    one = method_signals(target, m, z[1:2], z[1:2], c[1:2], u[1:2], torch.tensor([1]), cfg)
    torch.testing.assert_close(one, method_signals(target, m, z, z, c, u, torch.arange(3), cfg)[1:2])


def test_ddim_generation_recovers_the_memorised_sample():
    z_star = torch.randn(2, 2, 4, 4)
    target = Oracle(z_star.repeat(2, 1, 1, 1))
    out = ddim_sample(target, torch.zeros(2, 1), torch.zeros(2, 1), torch.randn(2, 2, 4, 4), steps=5, guidance=7.5)
    torch.testing.assert_close(out, z_star, atol=1e-4, rtol=1e-4)
    names = signal_names([attack_methods()[n] for n in ("baseline_loss", "generation_black_box")])
    assert names == ["baseline_loss/model_loss/t100", "baseline_loss/latent_error/t100", "baseline_loss/pixel_error/t100",
                     "generation_black_box/model_loss/gen", "generation_black_box/latent_error/gen", "generation_black_box/pixel_error/gen"]


def test_column_metrics_match_the_exact_definitions():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.4
    S = np.round(rng.normal(size=(300, 6)) + y[:, None] * np.linspace(0, 2, 6), 1)  # rounded: ties
    for fpr in (0.0, 0.01, 0.05, 0.3):
        ref = [float(tpr_at_fpr(torch.from_numpy(S[:, j]), torch.from_numpy(y), fpr)) for j in range(6)]
        np.testing.assert_allclose(tpr_at_fpr_columns(S, y, fpr), ref)
    np.testing.assert_allclose(auc_columns(S, y), [roc_auc_score(y, S[:, j]) for j in range(6)])


def test_threshold_table_picks_the_best_step_and_negates_signals():
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(200), np.zeros(200)].astype(bool)
    sig = rng.normal(size=(400, 3))
    sig[:, 1] -= 3.0 * y  # step t1: members have a much lower signal
    sig[:, 2] = np.nan    # a signal the method does not produce
    names = ["m/model_loss/t0", "m/model_loss/t1", "m/pixel_error/t0"]
    subsets = [np.sort(np.r_[rng.choice(200, 50, replace=False), 200 + rng.choice(200, 50, replace=False)]) for _ in range(20)]
    best, steps = threshold_table(names, sig, y, subsets)
    assert len(best) == 1 and best[0]["step"] == "t1" and best[0]["tpr_mean"] > 0.5 and len(steps) == 2
    ref = subset_metrics(-sig[:, 1], y, subsets)
    assert best[0]["tpr_mean"] == ref["tpr"].mean() and best[0]["tpr_std"] == ref["tpr"].std()
    chance = [r for r in steps if r["step"] == "t0"][0]
    assert chance["tpr_mean"] < 0.1 and abs(chance["auc_mean"] - 0.5) < 0.1


def test_classifier_attacks_learn_a_signal_and_stay_at_chance_without_one():
    rng = np.random.default_rng(2)
    y = np.r_[np.ones(150), np.zeros(150)].astype(int)
    X = rng.normal(size=(300, 4))
    subsets = [np.sort(np.r_[rng.choice(150, 30, replace=False), 150 + rng.choice(150, 30, replace=False)]) for _ in range(2)]
    Xs = X.copy()
    Xs[:, 2] += 3.0 * y
    out = classifier_attack(Xs, y, subsets, ["lr", "nn"], train_per_class=60)
    assert out["lr"]["auc"].mean() > 0.95 and out["nn"]["auc"].mean() > 0.9 and len(out["nn"]["tpr"]) == 2
    out = classifier_attack(X, y, subsets, ["lr"], train_per_class=60, grids={"lr": {"clf__C": [1.0]}})
    assert abs(out["lr"]["auc"].mean() - 0.5) < 0.15


def _tiny_laionmi(root, n=12, size=16):
    from PIL import Image

    from rsgm.datamodules.laionmi import image_path

    d = root / "data" / "laionmi"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("members", "nonmembers"):
        urls = [f"http://example.invalid/{split}/{i}.png" for i in range(n)]
        pd.DataFrame({"url": urls, "caption": [f"{split[:3]} photo {i}" for i in range(n)]}).to_parquet(d / f"{split}.parquet")
        for u in urls:
            p = image_path(d / "images", u)
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p, format="PNG")


def _configs_in(folder) -> str:
    """Copies of the LAION-mi configs under ``folder/configs``: relative paths in a config
    resolve against the folder above ``configs/``, so the test's tables and weights in
    ``folder`` are the ones found."""
    import shutil

    (folder / "configs").mkdir(exist_ok=True)
    for name in ("laionmi_sd14.yaml", "laionmi.yaml"):
        shutil.copy(os.path.join("configs", name), folder / "configs" / name)
    return str(folder / "configs" / "laionmi_sd14.yaml")


COMMON = ["--logger", "none", "--trainer.accelerator", "cpu", "--data.image_size", "16", "--data.attack_size", "12",
          "--data.subsets", "3", "--data.subset_size", "4", "--data.batch_size", "12",
          "--model.init_args.passes", "1", "--model.init_args.generation_steps", "3"]


def test_sd14_config_without_tables_or_weights_stops_with_one_line(tmp_path, monkeypatch):
    from rsgm.cli import main
    from rsgm.components.sd_adapter import StableDiffusionTarget, save_tiny_stable_diffusion
    from rsgm.errors import RSGMError

    cfg = _configs_in(tmp_path)
    monkeypatch.chdir(tmp_path)
    # The CLI prints the RSGMError as one line `rsgm: <message>` and exits 1.
    with pytest.raises(SystemExit, match=r"^rsgm: LAION-mi members table '\S*data/laionmi/members.parquet' not found: put the published members parquet"):
        main(["test", "--config", cfg, *COMMON])
    _tiny_laionmi(tmp_path)
    with pytest.raises(SystemExit, match=r"^rsgm: Stable Diffusion folder '\S*models/stable-diffusion-v1-4' not found: put the diffusers folder of Stable Diffusion v1.4"):
        main(["test", "--config", cfg, *COMMON])
    save_tiny_stable_diffusion(tmp_path / "models" / "stable-diffusion-v1-4")
    (tmp_path / "models" / "stable-diffusion-v1-4" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(RSGMError, match="is incomplete"):
        StableDiffusionTarget("models/stable-diffusion-v1-4").load()
    with pytest.raises(RSGMError, match="lacks tokenizer/"):
        import shutil

        shutil.rmtree(tmp_path / "models" / "stable-diffusion-v1-4" / "tokenizer")
        StableDiffusionTarget("models/stable-diffusion-v1-4").load()


@pytest.mark.slow
def test_sd14_config_runs_end_to_end_on_tiny_components(tmp_path, monkeypatch, capsys):
    from rsgm.cli import main
    from rsgm.components.sd_adapter import save_tiny_stable_diffusion

    cfg = _configs_in(tmp_path)
    monkeypatch.chdir(tmp_path)
    _tiny_laionmi(tmp_path)
    save_tiny_stable_diffusion(tmp_path / "models" / "stable-diffusion-v1-4")
    overlay = tmp_path / "light.yaml"  # one cheap classifier fit: the classifiers have their own tests
    overlay.write_text("trainer:\n  callbacks:\n    - class_path: rsgm.callbacks.laionmi.LaionMIReport\n      init_args:\n"
                       "        classifiers: [lr]\n        classifier_fits: 1\n        classifier_methods: [reversed_noising]\n")
    main(["test", "--config", cfg, "--config", str(overlay), "--run_name", "laionmi_sd14", *COMMON])
    out = capsys.readouterr().out
    assert "LAION-mi members: 12 rows, 12 images cached, 0 missing" in out and "reversed_noising" in out
    run = next((tmp_path / "runs" / "laionmi_sd14").iterdir())
    table = pd.read_csv(run / "laionmi" / "threshold.csv")
    # 4 white-box methods x 3 signals + grey-box latent + black-box pixel.
    assert len(table) == 14 and set(table["method"]) >= {"reversed_noising", "generation_black_box"}
    assert table["tpr_mean"].between(0, 1).all()
    clf = pd.read_csv(run / "laionmi" / "classifier.csv")
    assert list(clf["classifier"]) == ["lr"] and list(clf["fits"]) == [1]
    assert (run / "plots" / "laionmi_roc.png").is_file()
    saved = torch.load(run / "laionmi_signals.pt", weights_only=False)
    subsets = torch.load(run / "laionmi" / "subsets.pt", weights_only=True)["sd14"]
    n_eval = len(set(torch.cat(subsets).tolist()))  # the sampler visits the union of the 3 subsets once
    assert saved["results"]["sd14"]["features"].shape == (n_eval, len(saved["results"]["sd14"]["names"]))
