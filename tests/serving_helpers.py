"""Start ``rsgm serve`` on a free loopback port and talk to it (shared by the serving tests)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
import yaml

from rsgm.components.encoders import SmallConvEncoder

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, **overrides) -> tuple[Path, dict]:
    torch.manual_seed(0)
    if not (tmp_path / "enc.pt").exists():
        torch.save(SmallConvEncoder(width=8, rep_dim=16).state_dict(), tmp_path / "enc.pt")
    cfg = {
        "encoder": {"class_path": "rsgm.components.encoders.SmallConvEncoder", "init_args": {"width": 8, "rep_dim": 16}},
        "encoder_weights": str(tmp_path / "enc.pt"), "input_shape": [1, 16, 16], "max_batch": 64,
        "state_path": str(tmp_path / "state" / "s.sqlite"), "secret_file": str(tmp_path / "state" / "secret.bin"),
        "api_keys": {"key-a": "alice", "key-b": "bob"},
        # tiny lam: noise stays ~0, so answers before and after a restart must coincide
        "defense": {"noise": "coverage", "lam": 1e-12, "alpha": 1.0, "beta": 0.8, "transform": "affine", "n_proj": 4, "n_bits": 8},
        "batch_size": 8, "batch_timeout": 0.002,
    }
    cfg.update(overrides)
    path = tmp_path / f"serve{len(list(tmp_path.glob('serve*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


class Server:
    """``python -m rsgm.serving.cli`` in a subprocess; ``addr`` once it answers /v1/health."""

    def __init__(self, cfg_path: Path, *extra: str, timeout_s: float = 180.0):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "rsgm.serving.cli", "--config", str(cfg_path), "--port", "0", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        self.lines: list[str] = []
        ready = threading.Event()

        def pump():
            for line in self.proc.stdout:
                self.lines.append(line)
                if "listening on" in line:
                    self.addr = line.strip().split("http://")[1].split("/")[0]
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout_s) or not hasattr(self, "addr"):
            self.stop()
            raise AssertionError("server did not start:\n" + "".join(self.lines[-30:]))
        self.host, self.port = self.addr.split(":")[0], int(self.addr.split(":")[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # LitServe's worker processes share the session; make sure none is left
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def post(self, body=None, key=None, raw=None, path="/v1/embed", timeout=60):
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{self.addr}{path}", data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def raw(self, data: bytes, wait_s: float = 30.0) -> tuple[bytes, float]:
        """Send bytes on a fresh connection; (everything received until close or timeout, seconds)."""
        t0 = time.monotonic()
        with socket.create_connection((self.host, self.port), timeout=wait_s) as s:
            s.sendall(data)
            out = b""
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    out += chunk
                    if b"\r\n\r\n" in out and b"content-length" in out.lower():
                        head, _, body = out.partition(b"\r\n\r\n")
                        n = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
                        if len(body) >= n:
                            break
            except (socket.timeout, ConnectionResetError):
                pass
        return out, time.monotonic() - t0


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0
