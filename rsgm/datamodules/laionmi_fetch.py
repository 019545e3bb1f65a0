"""``rsgm fetch-images --config configs/laionmi.yaml``: fill the LAION-mi image cache.

A resumable downloader over the ``url`` column of both tables:

* at most ``concurrency`` requests in flight, and request starts to one host spaced by at
  least ``host_interval`` seconds (a per-host rate limit);
* transient failures (timeouts, connection errors, HTTP 429 and 5xx) are retried up to
  ``retries`` times with exponential back-off ``backoff * 2**attempt`` seconds;
* a response is kept only if its content type is ``image/*``, its body is at most
  ``max_bytes`` (checked while streaming) and Pillow decodes it completely (a truncated
  JPEG fails here);
* every outcome is appended to ``<cache>/manifest.jsonl`` (url, status, sha256, bytes,
  attempts). A second run skips URLs already fetched (file present) and permanent failures
  (4xx, not an image, undecodable, too large; ``--retry-failed`` tries them again), so it
  fetches only what is missing.

Images are stored at :func:`rsgm.datamodules.laionmi.image_path` (one file per URL, the
format found from the content).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image

from rsgm.datamodules.laionmi import image_path, read_table
from rsgm.errors import RSGMError

PERMANENT = ("http_4", "not_image", "decode_error", "too_large", "bad_url")


@dataclass
class FetchConfig:
    concurrency: int = 32
    host_interval: float = 0.2
    timeout: float = 15.0
    retries: int = 3
    backoff: float = 1.0
    max_bytes: int = 20 * 2**20
    retry_failed: bool = False


def read_manifest(cache_dir: str | Path) -> dict[str, dict]:
    """The last manifest record of every URL."""
    path = Path(cache_dir) / "manifest.jsonl"
    out: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interrupted run
                    continue
                out[rec["url"]] = rec
    return out


def is_permanent(status: str) -> bool:
    return status.startswith(PERMANENT) and status != "http_429"


def to_fetch(urls: list[str], cache_dir: str | Path, retry_failed: bool = False) -> list[str]:
    """URLs a run must (re)fetch given the manifest: not fetched yet, fetched but the file is
    gone, or failed transiently (permanently too with ``retry_failed``)."""
    done = read_manifest(cache_dir)
    todo, seen = [], set()
    for u in urls:
        if u in seen:
            continue
        seen.add(u)
        rec = done.get(u)
        if rec is None:
            todo.append(u)
        elif rec["status"] == "ok":
            if not image_path(cache_dir, u).is_file():
                todo.append(u)
        elif retry_failed or not is_permanent(rec["status"]):
            todo.append(u)
    return todo


class HostLimiter:
    """Spaces request starts to the same host by at least ``interval`` seconds."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.locks: dict[str, asyncio.Lock] = {}
        self.last: dict[str, float] = {}

    async def wait(self, host: str) -> None:
        lock = self.locks.setdefault(host, asyncio.Lock())
        async with lock:
            delay = self.last.get(host, -1e9) + self.interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.last[host] = time.monotonic()


def check_image(body: bytes) -> None:
    """Raises if Pillow cannot decode ``body`` completely."""
    with Image.open(io.BytesIO(body)) as img:
        img.load()


async def _attempt(client, url: str, cfg: FetchConfig) -> tuple[str, bytes | None]:
    import httpx

    try:
        async with client.stream("GET", url) as r:
            if r.status_code != 200:
                return f"http_{r.status_code}", None
            ctype = r.headers.get("content-type", "").split(";")[0].strip().lower()
            if not ctype.startswith("image/"):
                return "not_image", None
            if int(r.headers.get("content-length") or 0) > cfg.max_bytes:
                return "too_large", None
            buf = bytearray()
            async for chunk in r.aiter_bytes():
                buf += chunk
                if len(buf) > cfg.max_bytes:
                    return "too_large", None
    except httpx.TimeoutException:
        return "timeout", None
    except httpx.InvalidURL:
        return "bad_url", None
    except (httpx.TransportError, httpx.RemoteProtocolError):
        return "connection_error", None
    try:
        check_image(bytes(buf))
    except Exception:  # noqa: BLE001 - any decoder failure means an unusable image
        return "decode_error", None
    return "ok", bytes(buf)


def _transient(status: str) -> bool:
    return status in ("timeout", "connection_error", "http_429") or status.startswith("http_5")


async def fetch_one(client, url: str, cache_dir: Path, cfg: FetchConfig, limiter: HostLimiter) -> dict:
    host = urlsplit(url).netloc
    for attempt in range(cfg.retries + 1):
        await limiter.wait(host)
        status, body = await _attempt(client, url, cfg)
        if not _transient(status) or attempt == cfg.retries:
            break
        await asyncio.sleep(cfg.backoff * 2**attempt)
    rec = {"url": url, "status": status, "attempts": attempt + 1, "sha256": None, "bytes": None}
    if body is not None:
        dest = image_path(cache_dir, url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".part")
        tmp.write_bytes(body)
        os.replace(tmp, dest)  # atomic: an interrupted run never leaves half an image
        rec.update(sha256=hashlib.sha256(body).hexdigest(), bytes=len(body))
    return rec


async def fetch_all(urls: list[str], cache_dir: str | Path, cfg: FetchConfig | None = None, progress: bool = True) -> dict[str, int]:
    """Fetch what the manifest lacks; returns counts per status (plus ``skipped``)."""
    import httpx
    from tqdm.auto import tqdm

    cfg = cfg or FetchConfig()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    todo = to_fetch(urls, cache_dir, cfg.retry_failed)
    counts: dict[str, int] = {"skipped": len(set(urls)) - len(todo)}
    sem = asyncio.Semaphore(cfg.concurrency)
    limiter = HostLimiter(cfg.host_interval)
    bar = tqdm(total=len(todo), desc="fetch-images", unit="img", disable=not progress)
    limits = httpx.Limits(max_connections=cfg.concurrency)
    with open(cache_dir / "manifest.jsonl", "a") as manifest:
        async with httpx.AsyncClient(timeout=cfg.timeout, limits=limits, follow_redirects=True,
                                     headers={"User-Agent": "rsgm-fetch-images"}) as client:

            async def run(u: str) -> None:
                async with sem:
                    rec = await fetch_one(client, u, cache_dir, cfg, limiter)
                manifest.write(json.dumps(rec) + "\n")
                manifest.flush()
                counts[rec["status"]] = counts.get(rec["status"], 0) + 1
                bar.update(1)
                bar.set_postfix(ok=counts.get("ok", 0), failed=bar.n - counts.get("ok", 0))

            await asyncio.gather(*(run(u) for u in todo))
    bar.close()
    return counts


def _config_paths(config: str) -> dict:
    import yaml

    path = Path(config)
    if not path.is_file():
        raise RSGMError(f"config '{path}' not found: pass the LAION-mi data config, e.g. --config configs/laionmi.yaml.")
    cfg = yaml.safe_load(path.read_text()) or {}
    args = (cfg.get("data") or cfg).get("init_args") or {}
    missing = {"members_table", "nonmembers_table", "cache_dir"} - set(args)
    if missing:
        raise RSGMError(f"config '{path}' lacks data.init_args.{sorted(missing)[0]}: it must name members_table, nonmembers_table and cache_dir.")
    return args


def main(argv: list[str] | None = None) -> dict[str, int]:
    p = argparse.ArgumentParser(prog="rsgm fetch-images", description="Fill the LAION-mi image cache from the published tables (resumable).")
    p.add_argument("--config", required=True, help="data config naming members_table, nonmembers_table, cache_dir")
    d = FetchConfig()
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--host-interval", type=float, default=d.host_interval, help="seconds between request starts to one host")
    p.add_argument("--timeout", type=float, default=d.timeout)
    p.add_argument("--retries", type=int, default=d.retries)
    p.add_argument("--backoff", type=float, default=d.backoff)
    p.add_argument("--max-bytes", type=int, default=d.max_bytes)
    p.add_argument("--retry-failed", action="store_true", help="also retry permanent failures (4xx, not an image, ...)")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows of each table")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    paths = _config_paths(a.config)
    urls = []
    for split in ("members", "nonmembers"):
        urls += read_table(paths[f"{split}_table"], split)["url"].tolist()[: a.limit]
    cfg = FetchConfig(a.concurrency, a.host_interval, a.timeout, a.retries, a.backoff, a.max_bytes, a.retry_failed)
    counts = asyncio.run(fetch_all(urls, paths["cache_dir"], cfg, progress=not a.no_progress))
    print("fetch-images: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f"; manifest {Path(paths['cache_dir']) / 'manifest.jsonl'}")
    return counts
