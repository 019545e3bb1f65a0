"""``rsgm serve --config configs/b4b_serve.yaml [--host H] [--port P]``."""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from rsgm.serving.server import build_service, make_server
from rsgm.utils.run_folder import project_dir, resolve_paths


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="rsgm serve", description="Serve a B4B-defended encoder over HTTP.")
    parser.add_argument("--config", required=True, help="serve config (YAML), e.g. configs/b4b_serve.yaml")
    parser.add_argument("--host", default=None, help="overrides the config's host")
    parser.add_argument("--port", type=int, default=None, help="overrides the config's port (0: any free port)")
    args = parser.parse_args(argv)
    cfg_path = Path(args.config)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"serve config {cfg_path} not found; pass --config configs/b4b_serve.yaml")
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    resolve_paths(cfg, project_dir([cfg_path]))  # relative paths: against the repository, as in every rsgm config
    service = build_service(cfg)
    host = args.host or cfg.get("host", "127.0.0.1")
    port = cfg.get("port", 8080) if args.port is None else args.port
    server = make_server(service, host, port, int(cfg.get("max_body_bytes", 64 << 20)))
    print(f"rsgm serve: B4B encoder listening on http://{host}:{server.server_address[1]}/v1/embed", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
