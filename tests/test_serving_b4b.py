import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch
import yaml

from rsgm.components.encoders import SmallConvEncoder
from rsgm.defenses.lsh import LSHCoverage
from rsgm.defenses.store import UserStateStore


def _start(cfg_path):
    proc = subprocess.Popen([sys.executable, "-m", "rsgm.serving.cli", "--config", str(cfg_path), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise AssertionError(f"server did not start: {line}{proc.stdout.read()}")
    return proc, line.strip().split("http://")[1].split("/")[0]


def _post(addr, body, key=None, raw=None):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"http://{addr}/v1/embed", data=raw if raw is not None else json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def serve_config(tmp_path):
    torch.manual_seed(0)
    torch.save(SmallConvEncoder(width=8, rep_dim=16).state_dict(), tmp_path / "enc.pt")
    cfg = {
        "encoder": {"class_path": "rsgm.components.encoders.SmallConvEncoder", "init_args": {"width": 8, "rep_dim": 16}},
        "encoder_weights": str(tmp_path / "enc.pt"), "input_shape": [1, 16, 16], "max_batch": 64,
        "state_path": str(tmp_path / "state" / "s.sqlite"), "secret_file": str(tmp_path / "state" / "secret.bin"),
        "api_keys": {"key-a": "alice", "key-b": "bob"},
        # tiny lam: noise stays ~0, so answers before and after the restart must coincide
        "defense": {"noise": "coverage", "lam": 1e-12, "alpha": 1.0, "beta": 0.8, "transform": "affine", "n_proj": 4, "n_bits": 8},
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


def test_serve_two_keys_errors_and_restart_persistence(serve_config):
    path, cfg = serve_config
    x = torch.rand(20, 1, 16, 16, generator=torch.Generator().manual_seed(0)).tolist()
    proc, addr = _start(path)
    try:
        with urllib.request.urlopen(f"http://{addr}/v1/health", timeout=30) as r:
            assert json.loads(r.read()) == {"status": "ok"}
        s, a1 = _post(addr, {"inputs": x}, "key-a")
        assert s == 200 and a1["n"] == 20 and a1["dim"] == 16
        s, b1 = _post(addr, {"inputs": x[:5]}, "key-b")
        assert s == 200
        # same inputs, different users: different secret transforms
        assert not torch.allclose(torch.tensor(b1["embeddings"]), torch.tensor(a1["embeddings"][:5]), atol=1e-3)
        assert _post(addr, {"inputs": x}, None)[0] == 401
        assert _post(addr, {"inputs": x}, "wrong")[0] == 401
        for body, raw in [(None, b"not json"), ({"x": 1}, None), ({"inputs": [[1.0, 2.0]]}, None),
                          ({"inputs": []}, None), ({"inputs": [[[[float("nan")] * 16] * 16]]}, None),
                          ({"inputs": [[[["a"] * 16] * 16]]}, None)]:
            s, err = _post(addr, body, "key-a", raw=raw)
            assert s == 400 and err["error"], (body, raw)
        assert _post(addr, {"inputs": torch.zeros(65, 1, 16, 16).tolist()}, "key-a")[0] == 413
    finally:
        proc.terminate()
        proc.wait(30)
    store = UserStateStore(cfg["state_path"], LSHCoverage(16, 4, 8))
    alice = store.get("alice")
    assert alice.n_queries == 20 and store.get("bob").n_queries == 5  # rejected requests changed nothing
    store.close()

    proc, addr = _start(path)  # restart
    try:
        s, a2 = _post(addr, {"inputs": x}, "key-a")
        assert s == 200
        torch.testing.assert_close(torch.tensor(a2["embeddings"]), torch.tensor(a1["embeddings"]), atol=1e-4, rtol=1e-4)
    finally:
        proc.terminate()
        proc.wait(30)
    store = UserStateStore(cfg["state_path"], LSHCoverage(16, 4, 8))
    after = store.get("alice")
    assert after.n_queries == 40 and after.coverage == pytest.approx(alice.coverage)  # same inputs: same buckets


def test_missing_weights_is_one_line_error(serve_config, tmp_path):
    from rsgm.serving.server import build_service

    _, cfg = serve_config
    cfg["encoder_weights"] = str(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="encoder weights"):
        build_service(cfg)
