"""ExpertSim: separate experts, vectorised dispatch, every config, specialisation."""

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from rsgm.callbacks.expert_specialisation import expert_statistics
from rsgm.cli import main
from rsgm.components.gan import PeakRegressor, ZDCDiscriminator, ZDCGenerator
from rsgm.datamodules.zdc import ZDCDataModule
from rsgm.lightning_modules.expertsim import ExpertSim

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def small_model(**kwargs) -> ExpertSim:
    return ExpertSim(ZDCGenerator(width=0.125), ZDCDiscriminator(), PeakRegressor(), **kwargs)


def test_experts_share_no_parameter_tensor():
    model = small_model(n_experts=3)
    seen: dict[int, str] = {}
    for name, p in model.named_parameters():
        key = p.untyped_storage().data_ptr()
        assert key not in seen, f"{name} shares storage with {seen[key]}"
        seen[key] = name
    first = dict(model.experts[0].generator.named_parameters())
    second = dict(model.experts[1].generator.named_parameters())
    assert not torch.equal(first["dense.0.weight"], second["dense.0.weight"]), "experts must be initialised independently"
    # A step on one expert leaves the others untouched.
    before = second["dense.0.weight"].clone()
    first["dense.0.weight"].data.add_(1.0)
    assert torch.equal(second["dense.0.weight"], before)


def test_mixed_batch_dispatch_equals_per_sample_generation():
    torch.manual_seed(0)
    model = small_model(n_experts=3).eval()
    cond, z = torch.randn(24, 9), torch.randn(24, 10)
    expert_of = model.route(cond, torch.Generator().manual_seed(1))
    assert len(expert_of.unique()) == 3, "the test batch should mix all experts"
    mixed = model.dispatch(z, cond, expert_of)
    with torch.inference_mode():
        single = torch.cat([model.experts[int(e)].generator(z[b:b + 1], cond[b:b + 1]) for b, e in enumerate(expert_of)])
    torch.testing.assert_close(mixed, single, rtol=1e-4, atol=1e-5)
    # Routing a sample to another expert changes its output: the pairing matters.
    other = model.dispatch(z, cond, (expert_of + 1) % 3)
    assert not torch.allclose(other, mixed)


def test_argmax_routing_and_bad_arguments():
    model = small_model(n_experts=2, inference_routing="argmax")
    cond = torch.randn(16, 9)
    assert torch.equal(model.route(cond), model.router(cond).argmax(1))
    with pytest.raises(ValueError, match="aux_regressor"):
        ExpertSim(ZDCGenerator(width=0.125), ZDCDiscriminator(), None, lambda_aux=1e-3)
    with pytest.raises(ValueError, match="n_experts"):
        small_model(n_experts=0)


# One config per model family runs by default; each takes ~10 s, most of it parsing the CLI.
# A variant is the base config plus an overlay (tests/test_zdc_configs.py checks them).
VARIANTS = {
    "expertsim": ["expertsim.yaml"],
    "expertsim_n2": ["expertsim.yaml", "ablations/n2.yaml"],
    "zdc_gan": ["sdigan_zdc.yaml", "baselines/gan.yaml"],
    "zdc_sdigan_ir_ar": ["sdigan_zdc.yaml", "baselines/ir_ar.yaml"],
    **{f"expertsim+{p.stem}": ["expertsim.yaml", f"ablations/{p.name}"] for p in sorted((CONFIGS / "ablations").glob("*.yaml"))
       if p.stem != "n2"},
    "zdc_sdigan_ir": ["sdigan_zdc.yaml", "baselines/ir.yaml"],
}
DEFAULT_RUN = {"expertsim", "expertsim_n2", "zdc_gan", "zdc_sdigan_ir_ar"}


@pytest.mark.parametrize("variant", [v if v in DEFAULT_RUN else pytest.param(v, marks=pytest.mark.slow) for v in VARIANTS])
def test_fast_dev_run_of_every_expertsim_config(variant, tmp_path):
    configs = [a for c in VARIANTS[variant] for a in ("--config", str(CONFIGS / c))]
    main(["fit", *configs, "--trainer.fast_dev_run", "true", "--logger", "none",
          "--run_dir", str(tmp_path), "--data.n_synthetic", "300", "--data.batch_size", "32", "--data.eval_batch_size", "60",
          "--model.generator.init_args.width", "0.125"])


def test_five_experts_fit_and_test_write_expert_table(tmp_path):
    args = ["--config", str(CONFIGS / "expertsim.yaml"), "--run_dir", str(tmp_path), "--logger", "csv", "--model.n_experts", "5",
            "--data.n_synthetic", "400", "--data.batch_size", "40", "--data.eval_batch_size", "80",
            "--model.generator.init_args.width", "0.125", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
            "--trainer.limit_val_batches", "1"]
    main(["fit", *args])
    (run,) = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    import os

    os.environ.pop("RSGM_RUN_DIR")
    main(["test", *args, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    test_run = [p for p in tmp_path.glob("*/*") if p.name.startswith("test-")][0]
    rows = json.loads((test_run / "test_experts.json").read_text())
    assert [r["expert"] for r in rows] == [0, 1, 2, 3, 4]
    assert sum(r["n"] for r in rows) == 80 and sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert (test_run / "test_channel_w1.json").is_file()
    assert any(p.name.startswith("test_expert_channels") for p in test_run.glob("plots/*.png"))


def test_expert_statistics_hand_computed():
    rows = expert_statistics(torch.tensor([0, 0, 2, 2, 2]), torch.tensor([1.0, 3.0, 10.0, 20.0, 30.0]), 3)
    assert [r["share"] for r in rows] == [0.4, 0.0, 0.6]
    assert rows[0]["mean_intensity"] == 2.0 and rows[0]["std_intensity"] == 1.0
    assert rows[2]["mean_intensity"] == 20.0 and rows[2]["std_intensity"] == pytest.approx((200 / 3) ** 0.5)
    rows = expert_statistics(torch.tensor([0, 0, 2]), torch.tensor([1.0, 3.0, 10.0]), 3, torch.tensor([5.0, 7.0, 100.0]))
    assert [r["real_mean_intensity"] for r in rows][::2] == [6.0, 100.0] and rows[1]["real_mean_intensity"] != rows[1]["real_mean_intensity"]


def test_short_run_experts_specialise_and_router_does_not_collapse():
    # End to end at the benchmark's learning rates. The routing mechanism itself (intensity
    # bands with L_util, collapse without) is tested router-only in test_expertsim_losses.py.
    seed_everything(0)
    torch.set_num_threads(1)
    data = ZDCDataModule(n_synthetic=800, batch_size=64, eval_batch_size=400)
    model = small_model(lr_g=1e-3, lr_d=1e-4, lr_router=1e-3)
    Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0).fit(model, data)
    model.eval()
    out = model.generate(next(iter(data.test_dataloader())))
    rows = expert_statistics(out["expert"], out["fake"].flatten(1).sum(1), 3)
    shares = [r["share"] for r in rows]
    assert min(shares) >= 0.10, f"routing collapsed: shares {shares}"
    means = sorted(r["mean_intensity"] for r in rows)
    overall = out["fake"].flatten(1).sum(1).double().mean().item()
    gaps = [b - a for a, b in zip(means, means[1:])]
    assert min(gaps) > 0.1 * overall, f"expert mean intensities {means} are not distinct (overall mean {overall:.1f})"
