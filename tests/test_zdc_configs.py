"""ZDC / ExpertSim variants are short overlays on one base config; each resolves exactly
as the full copy it replaced (kept under tests/fixtures/configs_before_overlays/)."""

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from rsgm.cli import main

ROOT = Path(__file__).resolve().parents[1]
OLD = ROOT / "tests" / "fixtures" / "configs_before_overlays"
# old full copy -> the base and overlay that replace it
REPLACED = {
    "expertsim_n2": ["expertsim.yaml", "ablations/n2.yaml"],
    "expertsim_n4": ["expertsim.yaml", "ablations/n4.yaml"],
    "expertsim_n5": ["expertsim.yaml", "ablations/n5.yaml"],
    "expertsim_no_ldiff": ["expertsim.yaml", "ablations/no_ldiff.yaml"],
    "expertsim_no_lutil": ["expertsim.yaml", "ablations/no_lutil.yaml"],
    "expertsim_util0.1": ["expertsim.yaml", "ablations/util0.1.yaml"],
    "expertsim_util0.001_diff1e-5": ["expertsim.yaml", "ablations/util0.001_diff1e-5.yaml"],
    "expertsim_diff1e-3": ["expertsim.yaml", "ablations/diff1e-3.yaml"],
    "expertsim_diff1e-6": ["expertsim.yaml", "ablations/diff1e-6.yaml"],
    "zdc_gan": ["sdigan_zdc.yaml", "baselines/gan.yaml"],
    "zdc_sdigan": ["sdigan_zdc.yaml"],
    "zdc_sdigan_ir": ["sdigan_zdc.yaml", "baselines/ir.yaml"],
    "zdc_sdigan_ir_ar": ["sdigan_zdc.yaml", "baselines/ir_ar.yaml"],
}


def resolved(paths: list[Path]) -> dict:
    """The config `rsgm fit --print_config` resolves from these files."""
    args = ["fit"]
    for p in paths:
        args += ["--config", str(p)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*args, "--print_config"])
    return yaml.safe_load(out.getvalue())


# Resolving takes ~2 s per config: three representatives by default, all with -m slow.
FAST = {"expertsim_no_lutil", "zdc_sdigan_ir_ar", "zdc_gan"}


@pytest.mark.parametrize("old", [o if o in FAST else pytest.param(o, marks=pytest.mark.slow) for o in sorted(REPLACED)])
def test_overlay_resolves_as_the_old_full_copy(old):
    new = resolved([ROOT / "configs" / p for p in REPLACED[old]])
    assert new == resolved([OLD / f"{old}.yaml"])
    assert not (ROOT / "configs" / f"{old}.yaml").exists(), "the near-copy should be gone"


def test_overlays_are_short_and_change_something():
    base = resolved([ROOT / "configs" / "expertsim.yaml"])
    for overlay in sorted((ROOT / "configs" / "ablations").glob("*.yaml")) + sorted((ROOT / "configs" / "baselines").glob("*.yaml")):
        lines = [line for line in overlay.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
        assert len(lines) <= 10, f"{overlay.name} is not a short overlay"
    assert resolved([ROOT / "configs" / "expertsim.yaml", ROOT / "configs" / "ablations" / "n5.yaml"]) != base
