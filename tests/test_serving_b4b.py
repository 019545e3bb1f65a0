"""The LitServe B4B server against a real process on 127.0.0.1: API, hostile input, persistence."""
import json
import socket
import time

import pytest
import torch

from rsgm.defenses.lsh import LSHCoverage
from rsgm.defenses.store import UserStateStore
from rsgm.serving.server import ServeSettings
from serving_helpers import Server, status_of, write_config

X = torch.rand(20, 1, 16, 16, generator=torch.Generator().manual_seed(0)).tolist()
PIXEL = json.dumps(X[0])  # one valid input


def _body(inner: str) -> bytes:
    return ('{"inputs": [' + inner + ']}').encode()


def _req(key: str | None, body: bytes, extra: str = "", length: str | None = None) -> bytes:
    head = "POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    if key:
        head += f"Authorization: Bearer {key}\r\n"
    head += f"Content-Length: {len(body) if length is None else length}\r\n" + extra + "\r\n"
    return head.encode() + body


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    path, cfg = write_config(tmp, header_timeout_s=2, body_timeout_s=2, max_connections=24)
    srv = Server(path)
    srv.cfg = cfg
    yield srv
    srv.stop()


def test_valid_requests_two_users_and_health(server):
    with __import__("urllib.request").request.urlopen(f"http://{server.addr}/v1/health", timeout=30) as r:
        assert json.loads(r.read()) == {"status": "ok"}
    s, a = server.post({"inputs": X}, "key-a")
    assert s == 200 and a["n"] == 20 and a["dim"] == 16 and len(a["embeddings"]) == 20
    s, b = server.post({"inputs": X[:5]}, "key-b")
    assert s == 200
    # same inputs, different users: different secret transforms
    assert not torch.allclose(torch.tensor(b["embeddings"]), torch.tensor(a["embeddings"][:5]), atol=1e-3)
    s, spec = 200, json.loads(__import__("urllib.request").request.urlopen(f"http://{server.addr}/openapi.json", timeout=30).read())
    assert "B4B" in spec["info"]["description"] and "401" in spec["info"]["description"]


HOSTILE = [  # (name, key, body, status)
    ("no key", None, _body(PIXEL), 401),
    ("unknown key", "wrong", _body(PIXEL), 401),
    ("not JSON", "key-a", b"not json", 400),
    ("no inputs field", "key-a", b'{"x": 1}', 400),
    ("wrong shape", "key-a", b'{"inputs": [[1.0, 2.0]]}', 400),
    ("empty", "key-a", b'{"inputs": []}', 400),
    ("NaN literal", "key-a", _body(json.dumps([[[float("nan")] * 16] * 16])), 400),
    ("Infinity literal", "key-a", _body(json.dumps([[[float("inf")] * 16] * 16])), 400),
    ("numeric strings", "key-a", _body(json.dumps([[["0.5"] * 16] * 16])), 400),
    ("booleans", "key-a", _body(json.dumps([[[True] * 16] * 16])), 400),
    ("null", "key-a", _body(json.dumps([[[None] * 16] * 16])), 400),
    ("huge integer 10**400", "key-a", _body(json.dumps([[[1] * 16] * 16]).replace("1", "1" + "0" * 400, 1)), 400),
    ("objects", "key-a", _body(json.dumps([[[{"a": 1}] * 16] * 16])), 400),
    ("beyond float32 1e39", "key-a", _body(json.dumps([[[1e39] * 16] * 16])), 400),
    ("100k-deep nesting", "key-a", b"[" * 100_000 + b"]" * 100_000, 400),
    ("deep nesting in inputs", "key-a", b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
    ("too many inputs", "key-a", _body(",".join([PIXEL] * 65)), 413),
]


@pytest.mark.parametrize("name,key,body,status", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_body_gets_4xx_with_one_line_reason(server, name, key, body, status):
    out, _ = server.raw(_req(key, body))
    assert status_of(out) == status, (name, out[:300])
    err = json.loads(out.partition(b"\r\n\r\n")[2])["error"]
    assert err and "\n" not in err


def test_bad_headers_and_paths(server):
    out, _ = server.raw(_req("key-a", b"{}", length="abc"))
    assert status_of(out) == 400  # rejected by the HTTP parser, one-line body
    out, _ = server.raw(b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-a\r\n\r\n")
    assert status_of(out) == 411
    out, _ = server.raw(b"GET /v1/embed HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(out) == 405
    out, _ = server.raw(b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(out) == 404 and b'"error"' in out
    out, _ = server.raw(_req("key-a", b"", extra="X-Api-Key: key-b\r\n", length="99999999999999999999999"))
    assert status_of(out) == 400


def test_auth_and_size_are_checked_before_the_body_is_read(server):
    # 50 MB announced, nothing sent: the answer must come without waiting for the body
    out, t = server.raw(_req(None, b"", length=str(50 << 20)))
    assert status_of(out) == 401 and t < 10
    out, t = server.raw(_req("key-a", b"", length=str(50 << 20)))
    assert status_of(out) == 413 and t < 10


def test_slow_clients_are_timed_out_and_connections_bounded(server):
    # body announced but only half sent: 408 after body_timeout_s (2 s)
    body = _body(PIXEL)
    out, _ = server.raw(_req("key-a", body)[:-len(body) // 2])
    assert status_of(out) == 408
    # half-sent request head: the connection is closed after header_timeout_s (2 s)
    out, t = server.raw(b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nAuthor", wait_s=30)
    assert out == b"" and t < 20
    # more idle connections than max_connections: the next request is refused with 503, not queued
    held = [socket.create_connection((server.host, server.port)) for _ in range(30)]
    try:
        for s in held:
            s.sendall(b"POST /v1/embed HTTP/1.1\r\n")
        time.sleep(0.5)
        out, _ = server.raw(_req("key-b", _body(PIXEL)))
        assert status_of(out) == 503
    finally:
        for s in held:
            s.close()
    time.sleep(3)
    assert server.post({"inputs": X[:1]}, "key-b")[0] == 200  # and it recovers


def test_rejected_requests_are_never_charged(server):
    store = UserStateStore(server.cfg["state_path"], LSHCoverage(16, 4, 8))
    before = store.get("alice").n_queries
    for _, key, body, _ in HOSTILE:
        if key == "key-a":
            server.raw(_req(key, body))
    assert store.get("alice").n_queries == before
    assert server.post({"inputs": X[:3]}, "key-a")[0] == 200
    assert store.get("alice").n_queries == before + 3


@pytest.mark.slow
def test_restart_keeps_coverage_and_answers(tmp_path):
    path, cfg = write_config(tmp_path)
    srv = Server(path)
    try:
        s, a1 = srv.post({"inputs": X}, "key-a")
        assert s == 200
    finally:
        srv.stop()
    store = UserStateStore(cfg["state_path"], LSHCoverage(16, 4, 8))
    alice = store.get("alice")
    assert alice.n_queries == 20
    srv = Server(path)  # restart
    try:
        s, a2 = srv.post({"inputs": X}, "key-a")
        assert s == 200
        torch.testing.assert_close(torch.tensor(a2["embeddings"]), torch.tensor(a1["embeddings"]), atol=1e-4, rtol=1e-4)
    finally:
        srv.stop()
    after = store.get("alice")
    assert after.n_queries == 40 and after.coverage == pytest.approx(alice.coverage)  # same inputs: same buckets


def test_config_errors_are_one_line(tmp_path):
    from rsgm.errors import RSGMError

    _, cfg = write_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="encoder weights"):
        ServeSettings.from_config(dict(cfg, encoder_weights=str(tmp_path / "nope.pt")))
    with pytest.raises(RSGMError, match="unknown defence setting"):
        ServeSettings.from_config(dict(cfg, defense={"sigma": 1}))
    with pytest.raises(RSGMError, match="API keys"):
        ServeSettings.from_config(dict(cfg, api_keys={}))
    s = ServeSettings.from_config(cfg)
    assert s.max_body_bytes == 64 * 256 * 32 + 4096 and "alice" in s.users.values() and "key-a" not in s.users


def test_sigterm_finishes_the_request_in_flight_then_exits(tmp_path):
    """SIGTERM while a request's body is still arriving: that request is answered and charged,
    and the server process exits 0 soon after (LitServe alone left threaded uvicorn running)."""
    import signal

    path, cfg = write_config(tmp_path, body_timeout_s=20)
    srv = Server(path)
    try:
        message = _req("key-a", _body(PIXEL))
        with socket.create_connection((srv.host, srv.port), timeout=30) as sock:
            sock.sendall(message[: len(message) - 10])  # head and most of the body
            time.sleep(0.5)
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            sock.sendall(message[len(message) - 10:])
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert status_of(answer) == 200 and b'"n":1' in answer.replace(b" ", b"")
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()
    store = UserStateStore(cfg["state_path"], LSHCoverage(16, 4, 8))
    assert store.get("alice").n_queries == 1
