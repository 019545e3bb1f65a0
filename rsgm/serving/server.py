"""A B4B-defended encoder behind a small JSON-over-HTTP API (standard-library server).

Endpoints:

* ``POST /v1/embed`` with header ``Authorization: Bearer <api key>`` (or ``X-API-Key``) and body
  ``{"inputs": [[...]]}``, a nested list of shape ``[n, *input_shape]``; answers
  ``{"embeddings": [[...]], "n": n, "dim": d}`` with defended embeddings.
* ``GET /v1/health``: ``{"status": "ok"}`` (no key needed).

Unknown or missing keys get 401.  Malformed input gets 400 (413 for an oversized body or batch)
with a one-line message, and is rejected before the user's state is touched.  Coverage and
query counts persist in the SQLite state store; transforms derive from the secret file, so a
restart changes neither.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from torch import nn

from rsgm.components.encoders import load_encoder_weights
from rsgm.defenses.b4b import B4BDefense, load_or_create_secret


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def instantiate(spec: dict) -> nn.Module:
    """``{"class_path": "pkg.mod.Class", "init_args": {...}}`` -> instance."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError("encoder must be a mapping with class_path (and optional init_args)")
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**(spec.get("init_args") or {}))


def _key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class EmbeddingService:
    """Encoder + defence + API keys; thread-safe ``embed(api_key, inputs)``."""

    def __init__(self, encoder: nn.Module, defense: B4BDefense, api_keys: dict[str, str], input_shape: list[int],
                 max_batch: int = 256):
        if not api_keys:
            raise ValueError("no API keys configured; add api_keys: {<key>: <user id>} to the serve config")
        self.encoder = encoder.eval()
        self.defense, self.input_shape, self.max_batch = defense, tuple(input_shape), max_batch
        self.users = {_key_digest(k): str(u) for k, u in api_keys.items()}
        # the noise generator and the transform cache are not thread-safe; SQLite handles processes
        self._lock = threading.Lock()

    def user_for(self, api_key: str | None) -> str:
        user = self.users.get(_key_digest(api_key)) if api_key else None
        if user is None:
            raise RequestError(401, "missing or unknown API key; send it as 'Authorization: Bearer <key>'")
        return user

    def parse(self, payload: object) -> torch.Tensor:
        if not isinstance(payload, dict) or "inputs" not in payload:
            raise RequestError(400, "body must be a JSON object with an 'inputs' field")
        try:
            x = torch.tensor(payload["inputs"], dtype=torch.float32)
        except (TypeError, ValueError) as e:
            raise RequestError(400, f"'inputs' must be a rectangular nested list of numbers ({e})") from None
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise RequestError(400, f"'inputs' must have shape [n, {', '.join(map(str, self.input_shape))}], got {list(x.shape)}")
        if x.shape[0] == 0:
            raise RequestError(400, "'inputs' is empty")
        if x.shape[0] > self.max_batch:
            raise RequestError(413, f"at most {self.max_batch} inputs per request, got {x.shape[0]}")
        if not torch.isfinite(x).all():
            raise RequestError(400, "'inputs' contains NaN or infinity")
        return x

    def embed(self, api_key: str | None, payload: object) -> dict:
        user = self.user_for(api_key)
        x = self.parse(payload)
        with torch.no_grad():
            r = self.encoder(x).float()
        with self._lock:
            resp = self.defense.respond(user, r)
        return {"embeddings": resp.representation.tolist(), "n": int(x.shape[0]), "dim": int(resp.representation.shape[1])}


def build_service(cfg: dict, base: Path = Path(".")) -> EmbeddingService:
    """Service from a serve config (see configs/b4b_serve.yaml); relative paths are taken from ``base``."""
    def path(key: str) -> Path:
        if key not in cfg:
            raise ValueError(f"serve config lacks '{key}'")
        p = Path(cfg[key])
        return p if p.is_absolute() else base / p

    encoder = instantiate(cfg.get("encoder"))
    weights = path("encoder_weights")
    if not weights.is_file():
        raise FileNotFoundError(f"encoder weights {weights} not found; train them (rsgm fit --config configs/b4b_victim_digits.yaml) or set encoder_weights")
    load_encoder_weights(encoder, weights)
    keys = cfg.get("api_keys")
    if keys is None and "api_keys_file" in cfg:
        kf = path("api_keys_file")
        if not kf.is_file():
            raise FileNotFoundError(f"API key file {kf} not found; write a JSON object {{\"<key>\": \"<user id>\"}} there")
        keys = json.loads(kf.read_text())
    input_shape = list(cfg.get("input_shape") or [])
    if not input_shape:
        raise ValueError("serve config lacks input_shape, e.g. [1, 16, 16]")
    with torch.no_grad():
        dim = encoder.eval()(torch.zeros(2, *input_shape)).shape[1]
    state, secret = path("state_path"), path("secret_file")
    state.parent.mkdir(parents=True, exist_ok=True)
    secret.parent.mkdir(parents=True, exist_ok=True)
    defense = B4BDefense(dim, state, load_or_create_secret(secret), **(cfg.get("defense") or {}))
    return EmbeddingService(encoder, defense, keys or {}, input_shape, int(cfg.get("max_batch", 256)))


def make_handler(service: EmbeddingService, max_body_bytes: int):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, obj: dict) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _api_key(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                return auth[len("Bearer "):].strip()
            return self.headers.get("X-API-Key")

        def do_GET(self):
            if self.path == "/v1/health":
                self._send(200, {"status": "ok"})
            else:
                self._send(404, {"error": f"no endpoint {self.path}; use POST /v1/embed"})

        def do_POST(self):
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length > max_body_bytes:
                    self.close_connection = True
                    raise RequestError(413, f"body of {length} bytes exceeds the limit of {max_body_bytes}")
                raw = self.rfile.read(length)
                if self.path != "/v1/embed":
                    raise RequestError(404, f"no endpoint {self.path}; use POST /v1/embed")
                service.user_for(self._api_key())  # 401 before parsing anything
                try:
                    payload = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise RequestError(400, "body is not valid JSON") from None
                self._send(200, service.embed(self._api_key(), payload))
            except RequestError as e:
                self._send(e.status, {"error": e.message})

        def log_message(self, fmt, *args):  # keep API keys and bodies out of the console
            pass

    return Handler


def make_server(service: EmbeddingService, host: str = "127.0.0.1", port: int = 8080, max_body_bytes: int = 64 << 20) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(service, max_body_bytes))
    server.daemon_threads = True
    return server
