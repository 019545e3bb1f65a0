"""The offline pitfall experiment: fine-tuning data, weight start, per-target labels, multi-target attack."""

import json

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import Trainer

from rsgm.components.diffusion_adapters import PixelUNetTarget
from rsgm.datamodules.laionmi_pitfall import DigitsFineTuneData, DigitsPitfallMembership
from rsgm.datamodules.membership import digits_split


def _save_tiny(folder, seed):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, num_class_embeds=11,
                norm_num_groups=8, add_attention=False).save_pretrained(folder / "unet")  # as ClassConditionalDiffusion builds it
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")


def test_finetune_split_and_weight_start(tmp_path):
    from rsgm.lightning_modules.laionmi_pitfall import FineTunedDiffusion

    dm = DigitsFineTuneData(n_finetune=50)
    half = digits_split(0)
    assert dm.split["members"] == half["nonmembers"][:50] and dm.split["nonmembers"] == half["nonmembers"][50:]
    assert not set(dm.split["members"]) & set(half["members"])  # never a pre-training digit
    _save_tiny(tmp_path / "large", 0)
    m = FineTunedDiffusion(init_from=str(tmp_path / "large"), block_out_channels=(8, 16))
    ref = PixelUNetTarget(path=str(tmp_path / "large")).load()
    x, t, y = torch.rand(2, 1, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 2])
    torch.testing.assert_close(m.unet(x, t, class_labels=y).sample, ref.eps(x, t, y))


def test_multi_target_attack_uses_each_targets_own_labels(tmp_path):
    from rsgm.callbacks.laionmi import LaionMIReport
    from rsgm.lightning_modules.laionmi_attack import LaionMIAttack

    half = digits_split(0)
    splits = {"a": {"members": half["members"][:40], "nonmembers": half["nonmembers"][:60]},
              "b": {"members": half["nonmembers"][:30], "nonmembers": half["nonmembers"][30:80]}}
    paths = {}
    for name, s in splits.items():
        _save_tiny(tmp_path / name, 1 if name == "a" else 2)
        (tmp_path / name / "membership.json").write_text(json.dumps(s))
        paths[name] = str(tmp_path / name / "membership.json")
    dm = DigitsPitfallMembership(paths, batch_size=512)
    dm.setup()
    lab = torch.stack([r["membership"] for r in dm.rows])
    assert (lab[:, 0] == 1).sum() == 40 and (lab[:, 0] == 0).sum() == 60 and (lab[:, 1] == 1).sum() == 30
    capped = DigitsPitfallMembership(paths, max_per_class=25)
    capped.setup()
    lab_c = torch.stack([r["membership"] for r in capped.rows])
    assert [(lab_c[:, k] == v).sum().item() for k in (0, 1) for v in (1, 0)] == [25, 25, 25, 25]
    assert ((lab_c == 1) <= (lab == 1)).all() and ((lab_c == 0) <= (lab == 0)).all()  # a subset, same labels
    targets = {k: PixelUNetTarget(path=str(tmp_path / k)) for k in splits}
    model = LaionMIAttack(targets, methods=["baseline_loss", "reversed_noising", "generation_black_box"], passes=1,
                          generation_steps=2, subsets=5, subset_size=20)
    report = LaionMIReport(classifiers=["lr"], classifier_fits=2, classifier_methods=["reversed_noising"], plot=True)
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path / "run"),
            callbacks=[report], enable_checkpointing=False).test(model, datamodule=dm)
    for name, s in splits.items():
        res = model.results[name]
        assert sorted(res["index"].tolist()) == sorted(s["members"] + s["nonmembers"])
        assert res["is_member"].sum() == len(s["members"])
    # The same digit gets the same signals whichever target's labels it carries (shared seed).
    both = set(model.results["a"]["index"].tolist()) & set(model.results["b"]["index"].tolist())
    assert both and not torch.equal(model.results["a"]["features"][:1], model.results["b"]["features"][:1])
    table = pd.read_csv(tmp_path / "run" / "laionmi" / "threshold.csv")
    assert set(table["target"]) == {"a", "b"} and len(table) == 2 * (2 * 3 + 1)
    assert (tmp_path / "run" / "plots" / "laionmi_roc.png").is_file()
    subsets = torch.load(tmp_path / "run" / "laionmi" / "subsets.pt", weights_only=True)
    y = model.results["b"]["is_member"].numpy()
    assert all(len(s) == 40 and y[s.numpy()].sum() == 20 for s in subsets["b"])
    assert np.isfinite(table["tpr_mean"]).all()
