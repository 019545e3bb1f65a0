"""The prepared GPU benchmark runs end to end on a CPU with --small sizes, writes its table
(markdown + JSON), and a section that breaks is recorded without losing the others."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # main() sets its own thread count


def test_small_run_writes_every_section(gpu_bench, tmp_path):
    result = gpu_bench.main(["--small", "--devices", "cpu", "--out", str(tmp_path)])
    assert result["failures"] == []
    assert {r["section"] for r in result["rows"]} == {"zdc", "cdi", "di", "b4b"}
    assert all(r["value"] > 0 for r in result["rows"])
    assert any("compiled" in r["case"] for r in result["rows"] if r["section"] == "zdc")
    saved = json.loads((tmp_path / "gpu_bench_small.json").read_text())
    assert len(saved["table"]) == len(result["table"]) >= 7
    md = (tmp_path / "gpu_bench_small.md").read_text()
    assert "| section | case |" in md and md.count("\n| ") == len(result["table"]) + 1


def test_a_broken_section_is_recorded_and_the_others_still_run(gpu_bench, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setitem(gpu_bench.SECTIONS, "di", broken)
    result = gpu_bench.main(["--small", "--devices", "cpu", "--sections", "di", "b4b", "--out", str(tmp_path)])
    assert [(f["section"], f["device"]) for f in result["failures"]] == [("di", "cpu")]
    assert "out of memory" in result["failures"][0]["error"]
    assert {r["section"] for r in result["rows"]} == {"b4b"}
    assert "Failed sections" in (tmp_path / "gpu_bench_small.md").read_text()


def test_speed_ratio_direction(gpu_bench):
    rows = [{"section": "zdc", "case": "a", "metric": "samples/s", "value": 10.0, "device": "cpu"},
            {"section": "zdc", "case": "a", "metric": "samples/s", "value": 50.0, "device": "cuda"},
            {"section": "di", "case": "b", "metric": "s", "value": 4.0, "device": "cpu"},
            {"section": "di", "case": "b", "metric": "s", "value": 1.0, "device": "cuda"}]
    lines = gpu_bench.table(rows, ["cpu", "cuda"])
    assert [line["gpu_speedup"] for line in lines] == [5.0, 4.0]
