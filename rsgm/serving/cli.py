"""``rsgm serve --config configs/b4b_serve.yaml [--host H] [--port P] [--state.url URL] [--workers N]``."""
from __future__ import annotations

import argparse
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import yaml

from rsgm.errors import RSGMError
from rsgm.serving.server import ServeSettings, run_server
from rsgm.utils.run_folder import project_dir, resolve_paths


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _announce_when_ready(host: str, port: int, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=5) as r:
                if r.status == 200:
                    print(f"rsgm serve: B4B encoder listening on http://{host}:{port}/v1/embed", flush=True)
                    return
        except OSError:
            pass
        time.sleep(0.2)


def parse(argv: list[str]) -> tuple[ServeSettings, bool]:
    parser = argparse.ArgumentParser(prog="rsgm serve", description="Serve a B4B-defended encoder over HTTP (LitServe).")
    parser.add_argument("--config", required=True, help="serve config (YAML), e.g. configs/b4b_serve.yaml")
    parser.add_argument("--host", default=None, help="overrides the config's host (127.0.0.1, 0.0.0.0 or ::)")
    parser.add_argument("--port", type=int, default=None, help="overrides the config's port (0: any free port)")
    parser.add_argument("--state.url", dest="state_url", default=None,
                        help="state store: a SQLite path, sqlite:///path or postgresql://user@host:port/db (shared by replicas)")
    parser.add_argument("--workers", type=int, default=None, help="inference worker processes")
    parser.add_argument("--no-defense", action="store_true", help="serve the bare encoder (benchmark baseline only)")
    args = parser.parse_args(argv)
    cfg_path = Path(args.config)
    if not cfg_path.is_file():
        raise RSGMError(f"serve config {cfg_path} not found; pass --config configs/b4b_serve.yaml")
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    resolve_paths(cfg, project_dir([cfg_path]))  # relative paths: against the repository, as in every rsgm config
    if args.state_url:
        cfg["state_url"] = args.state_url
    for k in ("host", "port", "workers"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    settings = ServeSettings.from_config(cfg)
    if settings.port == 0:
        settings.port = free_port(settings.host)
    return settings, not args.no_defense


def main(argv: list[str]) -> None:
    settings, defended = parse(argv)

    def _stop(signum, frame):  # SIGTERM -> LitServe's graceful shutdown (in-flight requests finish)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    threading.Thread(target=_announce_when_ready, args=(settings.host, settings.port), daemon=True).start()
    run_server(settings, defended)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
