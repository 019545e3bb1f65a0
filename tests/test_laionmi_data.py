"""LAION-mi tables, image cache, datamodule and the resumable fetcher (loopback server only)."""

import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from rsgm.datamodules.laionmi import LaionMIMembership, image_path
from rsgm.datamodules.laionmi_fetch import FetchConfig, fetch_all, main as fetch_main, read_manifest
from rsgm.errors import RSGMError
from rsgm.privacy.laionmi_attacks import balanced_subsets


def _png(seed: int, size: int = 16) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(seed: int, size: int = 64) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


class _Server:
    """A loopback HTTP server: /img/N images, /missing 404, /slow times out, /html a web page,
    /trunc a truncated JPEG, /flaky two 503s then an image, /big an image over the size cap."""

    def __init__(self):
        self.hits = Counter()
        self.starts = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, ctype, body):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                path = self.path
                outer.hits[path] += 1
                outer.starts.append(time.monotonic())
                if path.startswith("/img/"):
                    self._send(200, "image/png", _png(int(path.split("/")[-1])))
                elif path == "/missing":
                    self._send(404, "text/plain", b"gone")
                elif path == "/slow":
                    time.sleep(1.0)
                    try:
                        self._send(200, "image/png", _png(0))
                    except OSError:
                        pass
                elif path == "/html":
                    self._send(200, "text/html; charset=utf-8", b"<html>not an image</html>")
                elif path == "/trunc":
                    body = _jpeg(3)
                    self._send(200, "image/jpeg", body[: len(body) // 2])
                elif path == "/flaky":
                    if outer.hits[path] <= 2:
                        self._send(503, "text/plain", b"busy")
                    else:
                        self._send(200, "image/png", _png(99))
                elif path == "/big":
                    self._send(200, "image/png", _png(5, size=128))
                else:
                    self._send(404, "text/plain", b"")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _cfg(**kw):
    base = dict(concurrency=4, host_interval=0.0, timeout=0.3, retries=2, backoff=0.01, max_bytes=20_000)
    return FetchConfig(**{**base, **kw})


def test_fetcher_resumes_retries_and_keeps_a_manifest(server, tmp_path):
    import asyncio

    u = lambda p: server.base + p  # noqa: E731
    good = [u(f"/img/{i}") for i in range(6)]
    urls = good + [u("/missing"), u("/slow"), u("/html"), u("/trunc"), u("/flaky"), u("/big")]
    cache = tmp_path / "cache"
    counts = asyncio.run(fetch_all(urls, cache, _cfg(), progress=False))
    man = read_manifest(cache)
    status = {k.replace(server.base, ""): v["status"] for k, v in man.items()}
    assert status == {**{f"/img/{i}": "ok" for i in range(6)}, "/missing": "http_404", "/slow": "timeout",
                      "/html": "not_image", "/trunc": "decode_error", "/flaky": "ok", "/big": "too_large"}
    assert counts["ok"] == 7 and counts["skipped"] == 0
    # Retries: the flaky URL succeeded on its third attempt, the slow one used all three; 404 is not retried.
    assert server.hits["/flaky"] == 3 and man[u("/flaky")]["attempts"] == 3
    assert server.hits["/slow"] == 3 and server.hits["/missing"] == 1
    # The manifest's sha256 is the stored file's, and the file decodes.
    for url in good + [u("/flaky")]:
        body = image_path(cache, url).read_bytes()
        import hashlib

        assert man[url]["sha256"] == hashlib.sha256(body).hexdigest() and man[url]["bytes"] == len(body)
        Image.open(io.BytesIO(body)).load()
    assert not image_path(cache, u("/trunc")).exists() and not image_path(cache, u("/html")).exists()

    # Resumption: lose one image and cut the manifest's last line in half, as an interrupted run would.
    image_path(cache, good[0]).unlink()
    text = (cache / "manifest.jsonl").read_text()
    (cache / "manifest.jsonl").write_text(text + '{"url": "http://127.0.0.1:1/x", "sta')
    before = Counter(server.hits)
    counts = asyncio.run(fetch_all(urls, cache, _cfg(retries=0), progress=False))
    new = {k: server.hits[k] - before[k] for k in server.hits if server.hits[k] != before[k]}
    # Only the lost image and the transient failure are fetched again.
    assert new == {"/img/0": 1, "/slow": 1}
    assert counts == {"skipped": 10, "ok": 1, "timeout": 1}
    # --retry-failed also retries permanent failures.
    before = Counter(server.hits)
    asyncio.run(fetch_all(urls, cache, _cfg(retries=0, retry_failed=True), progress=False))
    assert {k for k in server.hits if server.hits[k] != before[k]} == {"/missing", "/slow", "/html", "/trunc", "/big"}


def test_per_host_rate_limit_spaces_requests(server, tmp_path):
    import asyncio

    urls = [server.base + f"/img/{i}" for i in range(4)]
    asyncio.run(fetch_all(urls, tmp_path / "c", _cfg(concurrency=4, host_interval=0.3), progress=False))
    # Request arrivals at the one host are spaced by the interval, whatever the concurrency.
    gaps = np.diff(sorted(server.starts))
    assert len(gaps) == 3 and gaps.min() >= 0.2  # 0.3 s apart, less scheduling jitter


def _tables(tmp_path, n_m=8, n_nm=10, base="http://127.0.0.1:9"):
    mt, nt = tmp_path / "members.parquet", tmp_path / "nonmembers.parquet"
    pd.DataFrame({"url": [f"{base}/m{i}" for i in range(n_m)], "caption": [f"member {i}" for i in range(n_m)]}).to_parquet(mt)
    pd.DataFrame({"url": [f"{base}/n{i}" for i in range(n_nm)], "caption": [f"other {i}" for i in range(n_nm)]}).to_parquet(nt)
    return mt, nt


def _cache(tmp_path, table, keep):
    cache = tmp_path / "cache"
    for i, url in enumerate(pd.read_parquet(table)["url"]):
        if i in keep:
            p = image_path(cache, url)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(_png(i, size=20))
    return cache


def test_datamodule_counts_missing_and_keeps_balance(tmp_path, capsys):
    mt, nt = _tables(tmp_path)
    _cache(tmp_path, mt, keep={0, 1, 2, 4, 5})          # 3 of 8 members missing
    cache = _cache(tmp_path, nt, keep=set(range(9)))    # 1 of 10 non-members missing
    dm = LaionMIMembership(str(mt), str(nt), str(cache), image_size=16, attack_size=None, subsets=4, subset_size=3, batch_size=4)
    dm.setup("test")
    assert dm.missing == {"members": {"rows": 8, "cached": 5, "missing": 3}, "nonmembers": {"rows": 10, "cached": 9, "missing": 1}}
    assert "members: 8 rows, 5 images cached, 3 missing" in capsys.readouterr().out
    rows = dm.dataset.rows
    assert sum(r[1] for r in rows) == 5 and len(rows) == 10  # 5 + 5: balance kept, never 5 vs 9
    assert len(dm.eval_subsets) == 4 and all(len(s) == 6 for s in dm.eval_subsets)
    batches = list(dm.test_dataloader())
    b = batches[0]
    assert b["x"].shape[1:] == (3, 16, 16) and b["x"].min() >= -1 and b["x"].max() <= 1
    assert isinstance(b["cond"], list) and isinstance(b["cond"][0], str)
    seen = np.concatenate([bb["index"].numpy() for bb in batches])
    assert sorted(seen.tolist()) == np.unique(np.concatenate(dm.eval_subsets)).tolist()
    caption = {r[0][0]: r[0][1] for r in rows}
    assert all(c.startswith("member") == bool(m) for c, m in zip(b["cond"], b["is_member"].tolist()))
    assert len(caption) == 10


def test_balanced_subsets_protocol():
    y = np.r_[np.ones(50), np.zeros(70)]
    subs = balanced_subsets(y, n_subsets=100, per_class=20, seed=1)
    assert len(subs) == 100
    for s in subs:
        assert len(np.unique(s)) == 40 and y[s].sum() == 20
    assert len({tuple(s) for s in subs}) == 100  # random, not one subset repeated
    assert [s.tolist() for s in balanced_subsets(y, 3, 20, seed=1)] == [s.tolist() for s in subs[:3]]
    with pytest.raises(ValueError, match="attack set has 50 members"):
        balanced_subsets(y, 1, 60)


def test_missing_tables_and_cache_say_what_to_put_where(tmp_path):
    mt, nt = _tables(tmp_path)
    with pytest.raises(RSGMError, match="rsgm fetch-images"):
        LaionMIMembership(str(mt), str(nt), str(tmp_path / "nocache")).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(RSGMError, match="holds 0 member"):
        LaionMIMembership(str(mt), str(nt), str(tmp_path / "empty")).setup()
    with pytest.raises(RSGMError, match="members table .* not found: put the published members parquet"):
        LaionMIMembership(str(tmp_path / "x.parquet"), str(nt), str(tmp_path / "empty")).setup()
    pd.DataFrame({"link": ["a"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(RSGMError, match="lacks the column"):
        LaionMIMembership(str(tmp_path / "bad.parquet"), str(nt), str(tmp_path / "empty")).setup()


def test_fetch_images_subcommand(server, tmp_path, capsys):
    from rsgm.cli import EXTRA_COMMANDS, main

    assert EXTRA_COMMANDS["fetch-images"][0] == "rsgm.datamodules.laionmi_fetch:main"
    mt, nt = tmp_path / "members.parquet", tmp_path / "nonmembers.parquet"
    cfg = tmp_path / "laionmi.yaml"
    cfg.write_text(json.dumps({"data": {"class_path": "rsgm.datamodules.laionmi.LaionMIMembership", "init_args": {
        "members_table": str(mt), "nonmembers_table": str(nt), "cache_dir": str(tmp_path / "cache")}}}))
    pd.DataFrame({"url": [server.base + f"/img/{i}" for i in range(3)], "caption": ["a", "b", "c"]}).to_parquet(mt)
    pd.DataFrame({"url": [server.base + f"/img/{i}" for i in (10, 11)] + [server.base + "/missing"], "caption": ["d", "e", "f"]}).to_parquet(nt)
    main(["fetch-images", "--config", str(cfg), "--no-progress", "--host-interval", "0"])
    assert "fetch-images: http_404 1, ok 5, skipped 0" in capsys.readouterr().out
    counts = fetch_main(["--config", str(cfg), "--no-progress", "--host-interval", "0"])
    assert counts == {"skipped": 6}
    with pytest.raises(RSGMError, match="configs/laionmi.yaml"):
        fetch_main(["--config", str(tmp_path / "none.yaml")])
