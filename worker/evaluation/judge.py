"""An OpenAI-compatible chat-completions judge with retries, a concurrency limit, a rate limit and a verdict cache.

Any server speaking ``POST {base_url}/chat/completions`` works: OpenAI (GPT-4.1, as in the paper), or a local
vision-language model behind vLLM, SGLang or Ollama (``http://host:port/v1``). The image is sent inline as a
base64 PNG data URL.

Retries (tenacity, exponential back-off): transport errors, HTTP 429 and 5xx, and replies the protocol cannot
parse. Other HTTP errors (a bad key, an unknown model) fail at once with the server's message. When attempts run
out the image's verdict is a recorded failure (``status="failed"``, the last error), never a score.

The cache (SQLite, one file in the run directory) keeps successful verdicts keyed by
sha256(image bytes) + prompt text + judge model + protocol name/version, so a resumed or repeated run never asks
twice for the same verdict, and a different judge or a reworded protocol never reuses another's verdicts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, Field, SecretStr, field_validator
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from worker.evaluation.protocols import MalformedReply, Protocol
from worker.evaluation.suites import PromptRecord


class JudgeConfig(BaseModel):
    """Where the judge is and how hard to press it."""

    base_url: str = Field(description="OpenAI-compatible API root, e.g. https://api.openai.com/v1 or "
                                      "http://localhost:8000/v1 (vLLM, SGLang) or http://localhost:11434/v1 (Ollama).")
    model: str = Field(min_length=1, description="Judge model name, e.g. gpt-4.1-2025-04-14 or a local VLM's name.")
    api_key: SecretStr | None = Field(None, description="Bearer key; local servers usually need none.")
    max_concurrency: int = Field(4, ge=1, le=64, description="Requests in flight at once.")
    requests_per_minute: float | None = Field(None, gt=0, description="Start at most this many requests a minute "
                                                                      "(None: no limit beyond the concurrency).")
    max_attempts: int = Field(3, ge=1, le=10, description="Attempts per image, the first included.")
    retry_wait_s: float = Field(1.0, ge=0, description="First back-off wait; doubles each retry, capped at 30 s.")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout.")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature; 0 as in the paper.")

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"judge base_url must start with http:// or https://; got {v!r}")
        return v.rstrip("/")

    def public(self) -> dict[str, Any]:
        """The settings worth recording in a summary (never the key)."""
        return {"base_url": self.base_url, "model": self.model, "max_attempts": self.max_attempts,
                "temperature": self.temperature}


class JudgeHTTPError(RuntimeError):
    """The judge server answered with an HTTP error; ``retryable`` for 429 and 5xx."""

    def __init__(self, status: int, message: str):
        super().__init__(f"judge HTTP {status}: {message}")
        self.status = status
        self.retryable = status == 429 or status >= 500


class _Retryable(Exception):
    """Wraps an error worth another attempt."""


@dataclass
class Verdict:
    """The outcome of judging one image: ``status`` ``ok`` (``verdict`` holds the parsed reply) or ``failed``
    (``error`` says why); ``attempts`` made by this call (0 when ``cached``)."""

    status: str
    verdict: dict[str, Any] | None = None
    raw: str | None = None
    error: str | None = None
    attempts: int = 0
    cached: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "verdict": self.verdict, "raw": self.raw, "error": self.error,
                "attempts": self.attempts, "cached": self.cached}


def image_sha256(image_bytes: bytes) -> str:
    return hashlib.sha256(image_bytes).hexdigest()


def cache_key(image_hash: str, prompt: str, judge_model: str, protocol: Protocol) -> str:
    payload = json.dumps([image_hash, prompt, judge_model, protocol.key], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class VerdictCache:
    """Successful verdicts in a SQLite file, one row per cache key; safe to use from several threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, image_sha256 TEXT, "
                         "judge_model TEXT, protocol TEXT, verdict TEXT, raw TEXT, created REAL)")
        self._db.commit()

    def get(self, key: str) -> tuple[dict[str, Any], str] | None:
        with self._lock:
            row = self._db.execute("SELECT verdict, raw FROM verdicts WHERE key = ?", (key,)).fetchone()
        return (json.loads(row[0]), row[1]) if row else None

    def put(self, key: str, *, image_hash: str, judge_model: str, protocol: Protocol, verdict: dict[str, Any],
            raw: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (key, image_hash, judge_model, protocol.key, json.dumps(verdict), raw, time.time()))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class RateLimiter:
    """Spaces request starts at least ``60 / requests_per_minute`` seconds apart, across threads."""

    def __init__(self, requests_per_minute: float | None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.interval = 0.0 if requests_per_minute is None else 60.0 / requests_per_minute
        self._clock, self._sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if self.interval <= 0:
            return
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self._sleep(start - now)


class Judge:
    """Judges images of prompt records with a protocol; see the module docstring."""

    def __init__(self, config: JudgeConfig, cache: VerdictCache | None = None, *,
                 transport: httpx.BaseTransport | None = None, rate_limiter: RateLimiter | None = None):
        self.config = config
        self.cache = cache
        headers = {"Content-Type": "application/json"}
        if config.api_key is not None:
            headers["Authorization"] = f"Bearer {config.api_key.get_secret_value()}"
        self._client = httpx.Client(base_url=config.base_url, headers=headers, timeout=config.timeout_s,
                                    transport=transport)
        self._limiter = rate_limiter or RateLimiter(config.requests_per_minute)
        self._slots = threading.BoundedSemaphore(config.max_concurrency)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------- one image
    def judge(self, record: PromptRecord, image_bytes: bytes, protocol: Protocol) -> Verdict:
        """The verdict on one PNG image of ``record``: from the cache, else asked (with retries) and cached."""
        image_hash = image_sha256(image_bytes)
        key = cache_key(image_hash, record.prompt, self.config.model, protocol)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return Verdict("ok", verdict=hit[0], raw=hit[1], cached=True, meta={"image_sha256": image_hash})
        url = "data:image/png;base64," + base64.b64encode(image_bytes).decode("ascii")
        body = {"model": self.config.model, "messages": protocol.messages(record, url),
                "temperature": self.config.temperature, "max_tokens": protocol.max_tokens}
        attempts = 0
        last_raw: str | None = None

        def attempt() -> tuple[dict[str, Any], str]:
            nonlocal attempts, last_raw
            attempts += 1
            try:
                text = self._complete(body)
            except httpx.TransportError as exc:
                raise _Retryable(f"transport error: {exc!r}") from exc
            except JudgeHTTPError as exc:
                if exc.retryable:
                    raise _Retryable(str(exc)) from exc
                raise
            last_raw = text
            try:
                return protocol.parse(text), text
            except MalformedReply as exc:
                raise _Retryable(f"malformed reply: {exc}") from exc

        retrying = Retrying(stop=stop_after_attempt(self.config.max_attempts),
                            wait=wait_exponential(multiplier=self.config.retry_wait_s, max=30),
                            retry=retry_if_exception_type(_Retryable), reraise=False)
        try:
            verdict, raw = retrying(attempt)
        except RetryError as exc:
            cause = exc.last_attempt.exception()
            return Verdict("failed", raw=last_raw, error=f"{cause} (after {attempts} attempts)", attempts=attempts,
                           meta={"image_sha256": image_hash})
        except JudgeHTTPError as exc:
            return Verdict("failed", raw=last_raw, error=str(exc), attempts=attempts,
                           meta={"image_sha256": image_hash})
        if self.cache is not None:
            self.cache.put(key, image_hash=image_hash, judge_model=self.config.model, protocol=protocol,
                           verdict=verdict, raw=raw)
        return Verdict("ok", verdict=verdict, raw=raw, attempts=attempts, meta={"image_sha256": image_hash})

    def _complete(self, body: dict[str, Any]) -> str:
        with self._slots:
            self._limiter.acquire()
            response = self._client.post("/chat/completions", json=body)
        if response.status_code != 200:
            raise JudgeHTTPError(response.status_code, _error_message(response))
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise MalformedReply(f"not a chat-completions response: {response.text[:200]!r}") from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise MalformedReply(f"the reply has no text content: {content!r}")
        return content

    # -------------------------------------------------------------------------------------------- many images
    def judge_many(self, items: list[tuple[PromptRecord, bytes, Protocol]],
                   on_done: Callable[[int, Verdict], None] | None = None) -> list[Verdict]:
        """Judge ``items`` with up to ``max_concurrency`` requests in flight; ``on_done(index, verdict)`` runs in
        the caller's thread as each finishes (an exception there stops the rest and propagates)."""
        results: list[Verdict | None] = [None] * len(items)
        with ThreadPoolExecutor(max_workers=self.config.max_concurrency) as pool:
            futures = {pool.submit(self.judge, *item): i for i, item in enumerate(items)}
            try:
                for future in as_completed(futures):
                    i = futures[future]
                    results[i] = future.result()
                    if on_done is not None:
                        on_done(i, results[i])
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return results  # type: ignore[return-value]


def _error_message(response: httpx.Response) -> str:
    try:
        err = response.json().get("error")
        if isinstance(err, dict) and err.get("message"):
            msg = str(err["message"])
        else:
            msg = response.text[:300]
    except ValueError:
        msg = response.text[:300]
    hint = {401: " (check the judge API key)", 403: " (the key may not be allowed this model)",
            404: " (check the judge base URL, which should end in /v1, and the model name)"}.get(
        response.status_code, "")
    return msg + hint
