"""The per-chapter reproduction driver: listing, dispatch, and the shared table printer."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_list_names_every_chapter(capsys):
    reproduce = _load("reproduce")
    assert reproduce.main(["--list"]) == 0
    out = capsys.readouterr().out
    for chapter in (4, 5, 6, 7, 8, 9):
        assert f"chapter {chapter}:" in out


def test_dispatch_passes_arguments_after_double_dash(tmp_path, monkeypatch):
    reproduce = _load("reproduce")
    (tmp_path / "reproduce_ch4.py").write_text("def main(argv):\n    return 3 if argv == [\"--seeds\", \"0\", \"1\"] else 9\n")
    monkeypatch.setattr(reproduce, "HERE", tmp_path)
    assert reproduce.main(["--chapter", "4", "--", "--seeds", "0", "1"]) == 3
    with pytest.raises(SystemExit, match="chapter 5 has no script yet"):
        reproduce.main(["--chapter", "5"])


def test_mean_std_matches_numpy_and_table_is_markdown(capsys):
    common = _load("reproduce_common")
    values = [1.0, 2.5, 4.0]
    assert common.mean_std(values, digits=3) == f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"
    assert common.mean_std([7.25], digits=1) == "7.2"
    assert common.mean_std([]) == "n/a"
    text = common.print_table("T", ["a", "b"], [[1, "x"]], note="n")
    assert text.splitlines()[2:5] == ["| a | b |", "|---|---|", "| 1 | x |"]
    assert "### T" in capsys.readouterr().out
