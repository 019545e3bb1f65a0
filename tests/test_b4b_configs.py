"""Chapter-6 configs (configs/b4b/): short overlays whose rows exist, fast_dev_run of each on the
testbed, and the DINO ViT-S/16 victim (local weights only; a tiny random ViT stands in here)."""
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from lightning.pytorch import Trainer

from rsgm.callbacks.b4b_report import B4BReportCallback
from rsgm.cli import main
from rsgm.components.dino_vit import DinoViT
from rsgm.components.encoders import SmallConvEncoder
from rsgm.datamodules.b4b_testbed import B4BTestbedDataModule
from rsgm.defenses.config import DefenseConfig
from rsgm.lightning_modules.b4b_protocol import B4BProtocol

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TESTBED, IMAGENET = CONFIGS / "b4b_digits.yaml", CONFIGS / "b4b_simsiam_imagenet.yaml"
OVERLAYS = sorted((CONFIGS / "b4b").rglob("*.yaml"))


def bases_of(overlay: Path) -> list[Path]:
    if overlay.parent.name == "testbed":
        return [TESTBED]
    if overlay.parent.name == "imagenet" or overlay.name.startswith("dino"):
        return [IMAGENET]
    return [TESTBED, IMAGENET]  # a6_7 and the bucket overlays fit both


def merged(base: Path, overlay: Path) -> tuple[dict, dict]:
    """(model init_args, data init_args) as the overlay leaves them (its keys replace the base's)."""
    b, o = yaml.safe_load(base.read_text()), yaml.safe_load(overlay.read_text())
    model = b["model"]["init_args"] | (o.get("model") or {}).get("init_args", {})
    data = b["data"]["init_args"] | (o.get("data") or {}).get("init_args", {})
    return model, data


def scenarios(data: dict) -> set[str]:
    """Attack scenario names the protocol's accounts get (as B4BTestbedDataModule names them)."""
    largest = max(data["attack_queries"])
    return {f"attack-{q}" for q in data["attack_queries"]} | {f"sybil{k}x{largest // k}" for k in data["sybils"]}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_overlay_is_short_and_names_existing_rows(overlay):
    lines = [x for x in overlay.read_text().splitlines() if x.strip() and not x.lstrip().startswith("#")]
    assert len(lines) <= 12, f"{overlay.name} is not a short overlay"
    for base in bases_of(overlay):
        model, data = merged(base, overlay)
        assert (model, data) != merged(base, base), f"{overlay.name} changes nothing on {base.name}"
        for name, kw in model["defenses"].items():
            DefenseConfig.from_dict({"n_bits": model["n_bits"]} | kw)  # unknown keys or bad values raise
        rows = model["attack_rows"]
        if overlay.parent.name in ("testbed", "imagenet") or overlay.name.startswith("dino"):
            assert rows, f"{overlay.name}: an attack table needs attack rows"
        for row in rows:
            defense, scen = row.split("/")
            assert defense in model["defenses"] and scen in scenarios(data), f"{overlay.name}: row {row} matches no account on {base.name}"


def test_thesis_cost_values_in_the_imagenet_overlays():
    want = {"a6_1_lam1e-4": (1e-4, 1.0, 0.8), "a6_2_beta0.5": (1e-6, 1.0, 0.5), "a6_3_beta0.3": (1e-6, 1.0, 0.3),
            "a6_4_alpha0.1_beta0.3": (1e-6, 0.1, 0.3), "sybils_3_6": (1e-6, 1.0, 0.8)}
    for name, (lam, alpha, beta) in want.items():
        b4b = merged(IMAGENET, CONFIGS / "b4b" / "imagenet" / f"{name}.yaml")[0]["defenses"]["b4b"]
        assert (b4b["lam"], b4b["alpha"], b4b["beta"]) == (lam, alpha, beta), name
    dino = merged(IMAGENET, CONFIGS / "b4b" / "dino_vits16.yaml")[0]
    assert (dino["defenses"]["b4b"]["lam"], dino["defenses"]["b4b"]["alpha"], dino["defenses"]["b4b"]["beta"]) == (1e-6, 1000.0, 0.6)
    assert dino["encoder"]["class_path"] == "rsgm.components.dino_vit.DinoViT" and dino["encoder_weights"] is None


@pytest.fixture(scope="module")
def victim(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("victim") / "enc.pt"
    torch.save(SmallConvEncoder(width=32, rep_dim=64).state_dict(), path)  # the architecture of b4b_digits.yaml
    return str(path)


FAST = {"testbed/a6_4_alpha0.1_beta0.3.yaml"}  # sybils, B4B and attack rows: the rest are the same code with -m slow
TESTBED_OVERLAYS = [None] + [p for p in OVERLAYS if TESTBED in bases_of(p)]


@pytest.mark.parametrize("overlay", [o if o is not None and str(o.relative_to(CONFIGS / "b4b")) in FAST
                                     else pytest.param(o, marks=pytest.mark.slow) for o in TESTBED_OVERLAYS],
                         ids=lambda p: "base" if p is None else str(p.relative_to(CONFIGS / "b4b")))
def test_testbed_config_passes_fast_dev_run(overlay, victim, tmp_path):
    argv = ["test", "--config", str(TESTBED)] + ([] if overlay is None else ["--config", str(overlay)])
    root = tmp_path / "run"
    main(argv + ["--model.init_args.encoder_weights", victim, "--trainer.fast_dev_run", "true",
                 "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root)])
    os.environ.pop("RSGM_RUN_DIR", None)
    table = pd.read_csv(root / "b4b_table.csv")
    model, _ = merged(TESTBED, overlay or TESTBED)
    assert {f"Legit/{d}" for d in model["defenses"]} <= set(table["user"] + "/" + table["defense"])
    assert len(table[table.user != "Legit"]) == len(model["attack_rows"])  # every attack row was stolen and probed
    assert table[["digits", "shapes", "textures"]].notna().all().all()


def test_dino_vit_features_are_dino_eval_tokens():
    torch.manual_seed(0)
    vit = DinoViT(hidden_size=32, num_layers=3, num_heads=2, mlp_dim=64, patch_size=8, image_size=16, in_channels=1,
                  n_last_blocks=2).eval()
    x = torch.rand(3, 1, 16, 16)
    out = vit(x)
    assert out.shape == (3, 64) and vit.rep_dim == 64 and not vit.pretrained
    with torch.no_grad():
        full = vit.vit(pixel_values=x, output_hidden_states=True)
    # the last block's token after the final LayerNorm is HF's last_hidden_state; the one before is normed the same way
    assert torch.allclose(out[:, 32:], full.last_hidden_state[:, 0], atol=1e-5)
    assert torch.allclose(out[:, :32], vit.vit.layernorm(full.hidden_states[-2][:, 0]), atol=1e-5)
    assert not torch.allclose(out[:, :32], out[:, 32:])
    with pytest.raises(ValueError, match="n_last_blocks"):
        DinoViT(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, patch_size=8, image_size=16, n_last_blocks=3)


def test_dino_weights_load_from_a_local_folder_and_a_missing_one_is_one_line(tmp_path):
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8,
                    image_size=16, num_channels=1)
    torch.manual_seed(1)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "dino", safe_serialization=True)
    vit = DinoViT(weights=str(tmp_path / "dino"), n_last_blocks=2)
    assert vit.pretrained and vit.rep_dim == 64
    ref = ViTModel.from_pretrained(tmp_path / "dino", add_pooling_layer=False)
    assert all(torch.equal(a, b) for a, b in zip(vit.vit.state_dict().values(), ref.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="config.json or model.safetensors"):
        DinoViT(weights=str(tmp_path / "absent"))
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as info:
        main(["test", "--config", str(IMAGENET), "--config", str(CONFIGS / "b4b" / "dino_vits16.yaml"), "--run_dir", str(runs)])
    os.environ.pop("RSGM_RUN_DIR", None)
    msg = info.value.code
    assert isinstance(msg, str) and "\n" not in msg and str(ROOT / "models" / "dino_vits16") in msg and "model.safetensors" in msg


def test_dino_overlay_defences_run_the_protocol_with_a_tiny_vit(tmp_path):
    """The DINO overlay's defence block (alpha 1000, beta 0.6) through the protocol, a pretrained-style
    encoder (no encoder_weights file), fast_dev_run on the testbed."""
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8,
                    image_size=16, num_channels=1)
    torch.manual_seed(2)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "dino", safe_serialization=True)
    model_cfg = merged(IMAGENET, CONFIGS / "b4b" / "dino_vits16.yaml")[0]
    model = B4BProtocol(DinoViT(weights=str(tmp_path / "dino"), n_last_blocks=2), None, secret="t",
                        defenses=model_cfg["defenses"], attack_rows=["none/attack-300", "b4b/attack-600"],
                        surrogate=SmallConvEncoder(width=4, rep_dim=8), epochs=1, n_proj=4, n_bits=8)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, inference_mode=False,
                      enable_progress_bar=False, default_root_dir=tmp_path, fast_dev_run=True, callbacks=[B4BReportCallback()])
    trainer.test(model, datamodule=B4BTestbedDataModule(attack_queries=[300, 600], sybils=[], n_shapes=300, n_textures=300,
                                                        n_task=120, batch_size=100))
    table = pd.read_csv(tmp_path / "b4b_table.csv")
    assert list(table["user"]) == ["Legit", "Legit", "Attack", "Attack"]
    assert model.defense_configs["b4b"].alpha == 1000.0 and model.defense_configs["b4b"].beta == 0.6
    # fast_dev_run: one mixed batch; every account answered once under every defence
    assert all(len(tr) == 1 for tr in model.traces.values())


def test_reproduce_ch6_reads_run_folders_and_prints_thesis_beside_mean_std(tmp_path, capsys):
    import importlib.util
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("reproduce_ch6", ROOT / "benchmarks" / "reproduce_ch6.py")
    ch6 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ch6)
    for seed, acc in ((0, 60.0), (1, 70.0)):  # two finished runs of Table 6.4.1, one row each
        folder = ch6.run_dir("6.4.1", seed, tmp_path)
        folder.mkdir(parents=True)
        pd.DataFrame([dict(user="Attack", defense="b4b", queries="4000", coverage=0.06, digits=acc, shapes=acc + 3,
                           textures=acc + 6, mean=acc + 3)]).to_csv(folder / "b4b_table.csv", index=False)
        pd.DataFrame({"b4b/b4b/attack-4000/coverage": [0.06]}).to_csv(folder / "metrics.csv", index=False)
    assert ch6.main(["--tables", "6.4.1", "--seeds", "0", "1", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.startswith("| Attack, b4b, 4000 |")]
    # thesis mean of (35.72, 31.54, 19.74, 70.01) = 39.25; rsgm means 63 and 73 over the 3 tasks
    assert line.split(" | ")[2:] == ["39.3", "65.0 ± 7.1", "68.0 ± 7.1", "71.0 ± 7.1", "68.0 ± 7.1", "0.060 ± 0.000 |"]
    assert "| Legit, none, ALL | Legit, none, ALL | 88.0 | n/a |" in out  # rows without runs say so
