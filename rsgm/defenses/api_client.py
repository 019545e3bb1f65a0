"""Client of the served encoder API (``rsgm serve``), as an attacker or any user would use it.

``EmbeddingClient(endpoint, api_key).embed(x)`` sends ``x`` [n, *input_shape] in requests of at
most ``batch_size`` inputs to ``POST <endpoint>/v1/embed`` and returns the answers [n, d].
Transient failures are retried with exponential backoff: connection errors, 5xx, 408 and 429
(honouring ``Retry-After``), at most ``retries`` times per request; ``min_interval_s`` spaces
requests (a client-side rate limit).  Other 4xx answers are the caller's mistake and raise
``RSGMError`` with the server's one-line reason.
"""
from __future__ import annotations

import json
import time

import torch

from rsgm.errors import RSGMError

RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class EmbeddingClient:
    def __init__(self, endpoint: str, api_key: str, batch_size: int = 128, retries: int = 5, backoff_s: float = 0.2,
                 timeout_s: float = 120.0, min_interval_s: float = 0.0):
        import httpx

        if not endpoint.startswith(("http://", "https://")):
            raise RSGMError(f"endpoint must be an http(s) URL such as http://127.0.0.1:8080, got {endpoint!r}")
        self.url = endpoint.rstrip("/") + "/v1/embed"
        self.batch_size, self.retries, self.backoff_s, self.min_interval_s = batch_size, retries, backoff_s, min_interval_s
        self._http = httpx.Client(timeout=timeout_s, headers={"Authorization": f"Bearer {api_key}",
                                                             "Content-Type": "application/json"})
        self._last = 0.0
        self.n_requests = self.n_retries = 0

    def _post(self, inputs: list) -> list:
        import httpx

        body = json.dumps({"inputs": inputs})
        for attempt in range(self.retries + 1):
            wait = self.min_interval_s - (time.monotonic() - self._last)
            if wait > 0:
                time.sleep(wait)
            self._last = time.monotonic()
            self.n_requests += 1
            try:
                r = self._http.post(self.url, content=body)
            except httpx.TransportError as e:
                status, reason, retry_after = None, f"{type(e).__name__}: {e}", None
            else:
                if r.status_code == 200:
                    return r.json()["embeddings"]
                status, retry_after = r.status_code, r.headers.get("retry-after")
                try:
                    reason = r.json().get("error") or r.json().get("detail") or r.text
                except ValueError:
                    reason = r.text.strip()
                if status not in RETRY_STATUS:
                    raise RSGMError(f"the API at {self.url} answered {status}: {reason}")
            if attempt == self.retries:
                raise RSGMError(f"the API at {self.url} failed {self.retries + 1} times (last: {status or 'no answer'}: {reason}); "
                                "check that the server runs and lower the request rate")
            self.n_retries += 1
            delay = self.backoff_s * 2**attempt
            if retry_after and retry_after.replace(".", "", 1).isdigit():
                delay = max(delay, float(retry_after))
            time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = [torch.tensor(self._post(x[i:i + self.batch_size].tolist()), dtype=torch.float32)
               for i in range(0, len(x), self.batch_size)]
        return torch.cat(out)

    def close(self) -> None:
        self._http.close()
