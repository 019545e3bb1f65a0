"""A B4B-defended encoder served with LitServe (``rsgm serve --config configs/b4b_serve.yaml``).

Endpoints (the API of earlier rsgm versions, unchanged):

* ``POST /v1/embed`` with ``Authorization: Bearer <api key>`` (or ``X-API-Key``) and body
  ``{"inputs": [[...]]}``, a nested list of shape ``[n, *input_shape]``; answers
  ``{"embeddings": [[...]], "n": n, "dim": d}``.
* ``GET /v1/health`` -> ``{"status": "ok"}`` once the inference workers are up (503 before);
  ``GET /health`` is LitServe's own check.  ``GET /docs`` and ``/openapi.json`` document the API.

Every error is a JSON ``{"error": "<one line>"}``.  The request path, in order:

1. the HTTP layer (uvicorn, h11) drops a connection whose request head is not complete within
   ``header_timeout_s`` and answers malformed heads (e.g. ``Content-Length: abc``) with 400;
   ``max_connections`` bounds concurrent connections (503 beyond);
2. :class:`Guard` (ASGI, before any body byte is read): 404/405 for other paths, 401 for a
   missing or unknown key, 411 without a length, 400 for a bad length, 413 above
   ``max_body_bytes`` (by default what ``max_batch`` inputs need);
3. the body is read under a deadline (408) and a cap (413, also for chunked bodies), then
   parsed and checked by :func:`parse_inputs` (400: invalid JSON, nesting, non-numbers,
   booleans, strings, NaN/inf, numbers beyond float32, wrong shape; 413: too many inputs);
4. only a valid request reaches the LitServe queue, as a compact float32 payload; requests of
   many users are batched into one encoder forward, then the defence runs per user (one store
   transaction per user and batch).  A request whose store update fails gets 503 and is not
   charged; the user is charged only by a committed transaction, before the answer is sent.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib
import json
import math
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import litserve as ls
import numpy as np
import torch
from starlette.responses import JSONResponse, Response
from torch import nn

from rsgm.components.encoders import load_encoder_weights
from rsgm.defenses.b4b import B4BDefense, load_or_create_secret
from rsgm.defenses.config import DefenseConfig
from rsgm.errors import RSGMError

EMBED_PATH, HEALTH_PATH = "/v1/embed", "/v1/health"
PASS_THROUGH = {"/health", "/docs", "/openapi.json", "/docs/oauth2-redirect"}
BYTES_PER_NUMBER = 32  # generous: "-0.12345678901234567e-05, " is 26 bytes
FLOAT32_MAX = float(np.finfo(np.float32).max)


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def instantiate(spec: dict) -> nn.Module:
    """``{"class_path": "pkg.mod.Class", "init_args": {...}}`` -> instance."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise RSGMError("serve config: encoder must be a mapping with class_path (and optional init_args)")
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**(spec.get("init_args") or {}))


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _reject_constant(name: str):
    raise RequestError(400, f"'inputs' contains {name}; send finite numbers")


def parse_inputs(raw: bytes, input_shape: tuple[int, ...], max_batch: int) -> np.ndarray:
    """Body bytes -> float32 array [n, *input_shape], or a RequestError with a one-line reason."""
    try:
        payload = json.loads(raw, parse_int=float, parse_constant=_reject_constant)
    except RecursionError:
        raise RequestError(400, "body is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError(400, "body is not valid JSON") from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise RequestError(400, "body must be a JSON object with an 'inputs' field")
    x = payload["inputs"]
    if not isinstance(x, list):
        raise RequestError(400, "'inputs' must be a list")
    if len(x) == 0:
        raise RequestError(400, "'inputs' is empty")
    if len(x) > max_batch:
        raise RequestError(413, f"at most {max_batch} inputs per request, got {len(x)}")
    shape = (len(x), *input_shape)
    level = x
    for depth, size in enumerate(shape[1:], start=1):
        if any(type(e) is not list or len(e) != size for e in level):
            raise RequestError(400, f"'inputs' must have shape [n, {', '.join(map(str, input_shape))}]: "
                                    f"level {depth} must hold lists of {size}")
        level = [v for e in level for v in e]
    if any(type(v) is not float for v in level):  # ints arrive as float (parse_int); bool, str, None, dict do not
        raise RequestError(400, "'inputs' must hold numbers only (no booleans, strings or nulls)")
    arr = np.asarray(level, dtype=np.float64)
    if not np.isfinite(arr).all() or np.abs(arr).max() > FLOAT32_MAX:
        raise RequestError(400, "'inputs' holds a number that is infinite or beyond float32 range")
    return arr.astype(np.float32).reshape(shape)


@dataclass
class ServeSettings:
    """The serve config (configs/b4b_serve.yaml) after validation."""

    encoder: dict
    encoder_weights: Path
    input_shape: tuple[int, ...]
    secret_file: Path
    state: str
    users: dict[str, str]  # sha256(key) -> user id
    defense: DefenseConfig
    max_batch: int = 256
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    batch_size: int = 16
    batch_timeout: float = 0.002
    max_body_bytes: int = 0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 256
    request_timeout_s: float = 60.0
    accelerator: str = "cpu"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: dict, base: Path = Path(".")) -> "ServeSettings":
        def path(key: str) -> Path:
            if key not in cfg:
                raise RSGMError(f"serve config lacks '{key}'")
            p = Path(cfg[key])
            return p if p.is_absolute() else base / p

        known = {"encoder", "encoder_weights", "input_shape", "secret_file", "state_path", "state_url", "api_keys",
                 "api_keys_file", "defense", "max_batch", "host", "port", "workers", "batch_size", "batch_timeout",
                 "max_body_bytes", "header_timeout_s", "body_timeout_s", "max_connections", "request_timeout_s",
                 "accelerator"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise RSGMError(f"unknown serve setting(s) {unknown}; known: {sorted(known)}")
        weights = path("encoder_weights")
        if not weights.is_file():
            raise FileNotFoundError(f"encoder weights {weights} not found; train them (rsgm fit --config "
                                    "configs/b4b_victim_digits.yaml) or set encoder_weights")
        keys = cfg.get("api_keys")
        if keys is None and "api_keys_file" in cfg:
            kf = path("api_keys_file")
            if not kf.is_file():
                raise FileNotFoundError(f"API key file {kf} not found; write a JSON object {{\"<key>\": \"<user id>\"}} there")
            keys = json.loads(kf.read_text())
        if not keys:
            raise RSGMError("no API keys configured; add api_keys: {<key>: <user id>} to the serve config")
        input_shape = tuple(int(v) for v in (cfg.get("input_shape") or []))
        if not input_shape:
            raise RSGMError("serve config lacks input_shape, e.g. [1, 16, 16]")
        state = cfg.get("state_url") or str(path("state_path"))
        max_batch = int(cfg.get("max_batch", 256))
        auto_body = max_batch * math.prod(input_shape) * BYTES_PER_NUMBER + 4096
        s = cls(encoder=cfg.get("encoder"), encoder_weights=weights, input_shape=input_shape,
                secret_file=path("secret_file"), state=state, users={key_digest(k): str(u) for k, u in keys.items()},
                defense=DefenseConfig.from_dict(cfg.get("defense")), max_batch=max_batch,
                max_body_bytes=int(cfg.get("max_body_bytes") or auto_body))
        for k in ("host", "port", "workers", "batch_size", "batch_timeout", "header_timeout_s", "body_timeout_s",
                  "max_connections", "request_timeout_s", "accelerator"):
            if k in cfg:
                setattr(s, k, type(getattr(s, k))(cfg[k]))
        return s


def build_defense(s: ServeSettings, dim: int) -> B4BDefense:
    if not s.state.startswith(("postgresql://", "postgres://")):
        Path(s.state.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    s.secret_file.parent.mkdir(parents=True, exist_ok=True)
    return B4BDefense(dim, s.state, load_or_create_secret(s.secret_file), s.defense)


def load_encoder(s: ServeSettings) -> nn.Module:
    enc = instantiate(s.encoder)
    load_encoder_weights(enc, s.encoder_weights)
    return enc.eval()


class EmbeddingService:
    """Encoder + defence for batches that mix users; used by the LitServe worker and in-process."""

    def __init__(self, settings: ServeSettings, device: str = "cpu", defended: bool = True):
        self.settings, self.device, self.defended = settings, device, defended
        self.encoder = load_encoder(settings).to(device)
        with torch.no_grad():
            self.dim = int(self.encoder(torch.zeros(2, *settings.input_shape, device=device)).shape[1])
        self.defense = build_defense(settings, self.dim) if defended else None

    @torch.no_grad()
    def answer(self, requests: list[tuple[str, np.ndarray]]) -> list[np.ndarray | RequestError]:
        """One encoder forward for all requests; then one defence call per user."""
        x = torch.from_numpy(np.concatenate([a for _, a in requests])).to(self.device)
        r = self.encoder(x).float()
        if self.defense is None:
            out = r.cpu().numpy()
            bounds = np.cumsum([0] + [len(a) for _, a in requests])
            return [out[bounds[i]:bounds[i + 1]] for i in range(len(requests))]
        rows = defaultdict(list)  # user -> [(request index, start, end)] in r
        start = 0
        for i, (user, a) in enumerate(requests):
            rows[user].append((i, start, start + len(a)))
            start += len(a)
        results: list = [None] * len(requests)
        for user, parts in rows.items():
            idx = torch.cat([torch.arange(s, e) for _, s, e in parts])
            try:
                ans = self.defense.respond(user, r[idx.to(r.device)]).representation.cpu().numpy()
            except Exception as e:  # store down or similar: these requests fail, uncharged
                for i, _, _ in parts:
                    results[i] = RequestError(503, f"the state store is unavailable ({type(e).__name__}); retry later")
                continue
            off = 0
            for i, s, e in parts:
                results[i] = ans[off:off + e - s]
                off += e - s
        return results


class B4BLitAPI(ls.LitAPI):
    """LitServe worker: decode the guard's compact payload, batch across users, defend per user."""

    def __init__(self, settings: ServeSettings, defended: bool = True):
        super().__init__(max_batch_size=settings.batch_size, batch_timeout=settings.batch_timeout, api_path=EMBED_PATH)
        self.settings, self.defended = settings, defended

    def setup(self, device):
        torch.set_num_threads(1)
        self.service = EmbeddingService(self.settings, device, self.defended)

    def decode_request(self, request):  # no annotation: LitServe passes the parsed JSON body
        shape = tuple(request["shape"])
        return request["user"], np.frombuffer(base64.b64decode(request["data"]), dtype=np.float32).reshape(shape)

    def batch(self, inputs):
        return inputs

    def predict(self, x):
        if isinstance(x, tuple):  # batch_size 1: LitServe's unbatched loop
            return self.service.answer([x])[0]
        return self.service.answer(x)

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        if isinstance(output, RequestError):
            return JSONResponse({"error": output.message}, status_code=output.status)
        return Response(json.dumps({"embeddings": output.tolist(), "n": int(output.shape[0]), "dim": int(output.shape[1])}),
                        media_type="application/json")


def _json(status: int, obj: dict, extra_headers: list | None = None) -> tuple[int, list, bytes]:
    body = json.dumps(obj).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return status, headers + (extra_headers or []), body


class Guard:
    """ASGI middleware in front of LitServe: authenticate, cap, time and validate before queueing."""

    def __init__(self, app, settings: ServeSettings):
        self.app, self.s = app, settings

    async def _send(self, send, status: int, obj: dict, close: bool = False) -> None:
        status, headers, body = _json(status, obj, [(b"connection", b"close")] if close else None)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path == HEALTH_PATH:
            return await self._health(scope, receive, send)
        if path in PASS_THROUGH and method in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        if path != EMBED_PATH:
            return await self._send(send, 404, {"error": f"no endpoint {path}; use POST {EMBED_PATH}"}, close=True)
        if method != "POST":
            return await self._send(send, 405, {"error": f"use POST {EMBED_PATH}"}, close=True)
        try:
            user = self._authenticate(scope)
            raw = await self._read_body(scope, receive)
            x = parse_inputs(raw, self.s.input_shape, self.s.max_batch)
        except RequestError as e:
            # the body may be unread: close the connection rather than parse what follows
            return await self._send(send, e.status, {"error": e.message}, close=True)
        body = json.dumps({"user": user, "shape": list(x.shape), "data": base64.b64encode(x.tobytes()).decode()}).encode()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"transfer-encoding", b"content-type")]
        headers += [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
        sent = False

        async def inner_receive():
            nonlocal sent
            if sent:
                return await receive()  # waits for the disconnect
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(dict(scope, headers=headers), inner_receive, send)

    def _authenticate(self, scope) -> str:
        h = dict(scope["headers"])
        try:
            auth = h.get(b"authorization", b"").decode("latin-1")
            key = auth[7:].strip() if auth.startswith("Bearer ") else h.get(b"x-api-key", b"").decode("latin-1").strip()
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
            key = ""
        user = self.s.users.get(key_digest(key)) if key else None
        if user is None:
            raise RequestError(401, "missing or unknown API key; send it as 'Authorization: Bearer <key>'")
        return user

    async def _read_body(self, scope, receive) -> bytes:
        h = dict(scope["headers"])
        cap = self.s.max_body_bytes
        length = None
        if b"content-length" in h:
            v = h[b"content-length"].strip()
            if not v.isdigit() or len(v) > 18:
                raise RequestError(400, "Content-Length must be a non-negative integer")
            length = int(v)
            if length > cap:
                raise RequestError(413, f"body of {length} bytes exceeds the limit of {cap} (max_batch inputs)")
        elif b"chunked" not in h.get(b"transfer-encoding", b"").lower():
            raise RequestError(411, "send a Content-Length header")
        chunks, total = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.s.body_timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise RequestError(408, f"body not received within {self.s.body_timeout_s:g} s")
            try:
                msg = await asyncio.wait_for(receive(), remaining)
            except asyncio.TimeoutError:
                raise RequestError(408, f"body not received within {self.s.body_timeout_s:g} s") from None
            if msg["type"] == "http.disconnect":
                raise RequestError(400, "client disconnected before sending the body")
            chunk = msg.get("body", b"")
            total += len(chunk)
            if total > cap:
                raise RequestError(413, f"body exceeds the limit of {cap} bytes (max_batch inputs)")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        return b"".join(chunks)

    async def _health(self, scope, receive, send):
        status = {}

        async def capture(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]

        await self.app(dict(scope, path="/health", raw_path=b"/health", method="GET"), receive, capture)
        if status.get("code") == 200:
            return await self._send(send, 200, {"status": "ok"})
        return await self._send(send, 503, {"error": "the inference workers are not ready yet"})


def guarded_h11(header_timeout_s: float):
    """uvicorn's h11 protocol that closes connections whose request head is not complete in time."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_deadline)

        def _head_deadline(self):
            if self.cycle is None and not self.transport.is_closing():  # no complete request head yet
                self.transport.close()

        def connection_lost(self, exc):
            self._head_timer.cancel()
            super().connection_lost(exc)

    return GuardedH11


OPENAPI_DESCRIPTION = (
    "B4B-defended encoder. POST /v1/embed with 'Authorization: Bearer <key>' and {\"inputs\": [n x input_shape numbers]}; "
    "answers {\"embeddings\": [[...]], \"n\": n, \"dim\": d}. Errors are {\"error\": \"<one line>\"}: 400 malformed body, "
    "401 missing/unknown key, 404 unknown path, 405 wrong method, 408 body too slow, 411 no length, 413 too large, "
    "503 overloaded or state store unavailable, 504 queue timeout. GET /v1/health -> {\"status\": \"ok\"}.")


class _LitServer(ls.LitServer):
    """LitServer whose shutdown also stops HTTP servers run in threads.

    LitServe ends its HTTP servers with ``terminate()``, which a thread does not have: with
    ``api_server_worker_type="thread"`` a SIGTERM left uvicorn serving and the process never
    exited. Here each such uvicorn server is told to exit (it stops accepting connections and
    lets the requests in flight finish, up to ``uvicorn_graceful_timeout``) before LitServe
    stops the inference workers, so no acknowledged query is lost."""

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason="normal"):
        threads = {k: w for k, w in uvicorn_workers.items() if isinstance(w, threading.Thread)}
        for w in threads.values():
            uvicorn_server = getattr(getattr(w, "_target", None), "__self__", None)
            if uvicorn_server is not None:
                uvicorn_server.should_exit = True
        for w in threads.values():
            w.join(self.uvicorn_graceful_timeout + 5)
        rest = {k: w for k, w in uvicorn_workers.items() if k not in threads}
        super()._perform_graceful_shutdown(manager, rest, shutdown_reason)


def make_server(settings: ServeSettings, defended: bool = True):
    """The LitServer (not started) with the guard, batching and workers of ``settings``."""
    api = B4BLitAPI(settings, defended)
    server = _LitServer(api, accelerator=settings.accelerator, workers_per_device=settings.workers,
                          timeout=settings.request_timeout_s, middlewares=[(Guard, {"settings": settings})],
                          model_metadata={"description": "B4B-defended encoder"})
    server.app.title, server.app.description = "rsgm B4B encoder API", OPENAPI_DESCRIPTION
    server.app.openapi_schema = None
    return server


def run_server(settings: ServeSettings, defended: bool = True) -> None:
    server = make_server(settings, defended)
    server.run(host=settings.host, port=settings.port, generate_client_file=False, log_level="warning",
               num_api_servers=1, api_server_worker_type="thread", http=guarded_h11(settings.header_timeout_s),
               limit_concurrency=settings.max_connections, timeout_keep_alive=5)
