"""A client for any OpenAI-compatible chat-completions endpoint that takes images (vLLM, OpenAI, ...).

Judging a benchmark means thousands of requests, so the client retries what is worth retrying
(connection errors, timeouts, HTTP 429 and 5xx), stops at once on what is not (a wrong key, model or
path), spaces requests to a rate limit shared by all threads, and caches every verdict by its
request: a rerun, or a resumed evaluation, asks the judge only what it has not answered yet.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import string
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import requests
from PIL import Image

from irg import storage

log = logging.getLogger(__name__)

BACKOFF_CAP_S = 60.0
# A server's Retry-After is honoured up to this; beyond it (e.g. a daily quota) waiting is pointless.
RETRY_AFTER_CAP_S = 600.0
# How much of an error body goes into a message.
ERROR_TEXT_CHARS = 500


class JudgeError(RuntimeError):
    """The judge cannot answer: a refused request, a malformed reply, or every retry failed."""


def image_part(image: Image.Image) -> dict:
    """``image`` as a chat message part: a PNG data URL (lossless, so the judge sees what was generated)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


def check_template(template: str, allowed: set[str], required: set[str]) -> None:
    """A judge prompt template may use only the ``allowed`` {fields} (it is filled with str.format) and
    must use the ``required`` ones (without them the judge is not asked what it should judge)."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    if fields - allowed:
        raise ValueError(f"template: unknown fields {sorted(fields - allowed)}; it may use "
                         f"{', '.join('{' + f + '}' for f in sorted(allowed))} (double other braces)")
    if required - fields:
        raise ValueError(f"template: lacks {', '.join('{' + f + '}' for f in sorted(required - fields))}")


def judge_all(judge: JudgeClient, score_one: Callable, items: Sequence[tuple]) -> list:
    """``score_one(*item)`` for every item, ``judge.max_concurrency`` at a time, in order. The first
    error (a :class:`JudgeError`: the endpoint is broken) stops the rest rather than send them all."""
    pool = ThreadPoolExecutor(max_workers=judge.max_concurrency, thread_name_prefix="judge")
    try:
        futures = [pool.submit(score_one, *item) for item in items]
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def complete_readable(judge: JudgeClient, messages: list[dict], read: Callable, unreadable: type[Exception],
                      reminder: str, retries: int, max_tokens: int | None = None) -> tuple[object, str, str | None]:
    """``(read(reply), reply, None)`` for the judge's reply to ``messages``; a reply ``read`` rejects with
    ``unreadable`` is asked again ``retries`` times, continuing the conversation with ``reminder`` (which
    also gives each retry a cache key of its own), then ``(None, last reply, the error)``."""
    reply = judge.complete(messages, max_tokens)
    for retry in range(retries + 1):
        try:
            return read(reply), reply, None
        except unreadable as e:
            if retry == retries:
                return None, reply, str(e)
            messages = [*messages, {"role": "assistant", "content": reply}, {"role": "user", "content": reminder}]
            reply = judge.complete(messages, max_tokens)


def retry_delay(attempt: int, retry_after: str | None, backoff_s: float) -> float:
    """Seconds to wait before retry ``attempt + 1``: the server's numeric Retry-After if it sent one,
    else ``backoff_s * 2**attempt``, capped."""
    if retry_after is not None:
        try:
            seconds = float(retry_after)
        except ValueError:  # an HTTP date: rare from these servers, back off as usual
            seconds = math.nan
        if math.isfinite(seconds) and seconds >= 0:
            return min(seconds, RETRY_AFTER_CAP_S)
    return min(backoff_s * 2**attempt, BACKOFF_CAP_S)


def cache_key(request: dict) -> str:
    """sha256 of the request's canonical JSON: equal requests (to any server) share a key."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class JudgeClient:
    """Chat completions from ``{base_url}/chat/completions`` (``base_url`` like ``http://127.0.0.1:8000/v1``).

    ``max_concurrency`` is how many requests callers should run at once (scorers size their thread
    pools by it; the client also never has more in flight). ``requests_per_minute`` spaces requests
    evenly across all threads. ``cache_dir`` (a folder or an ``s3://`` URI) keeps every answer.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, timeout_s: float = 120.0,
                 max_retries: int = 5, requests_per_minute: float | None = None, max_concurrency: int = 4,
                 cache_dir: str | None = None, temperature: float = 0.0, max_tokens: int = 512,
                 backoff_s: float = 1.0):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: must start with http:// or https://, got {base_url!r}")
        if api_key is not None and (api_key != api_key.strip() or not api_key.isprintable()):
            # Checked here because the HTTP library's own error would quote the key.
            raise ValueError("api_key: has surrounding whitespace or control characters (a stray newline?)")
        if max_retries < 0:
            raise ValueError(f"max_retries: must be >= 0, got {max_retries}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency: must be >= 1, got {max_concurrency}")
        if requests_per_minute is not None and requests_per_minute <= 0:
            raise ValueError(f"requests_per_minute: must be > 0, got {requests_per_minute}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.cache_dir = cache_dir
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.backoff_s = backoff_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._interval = 60.0 / requests_per_minute if requests_per_minute else None
        self._next_slot = 0.0
        self._rate_lock = threading.Lock()
        self._in_flight = threading.BoundedSemaphore(max_concurrency)
        self._stats_lock = threading.Lock()
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0}

    def complete(self, messages: list[dict], max_tokens: int | None = None) -> str:
        """The judge's reply (``choices[0].message.content``) to ``messages``, from the cache if it has it;
        at most ``max_tokens`` long (default: the client's)."""
        request = {"model": self.model, "messages": messages, "temperature": self.temperature,
                   "max_tokens": max_tokens or self.max_tokens}
        return self._answer(request, self._content)

    def top_logprobs(self, messages: list[dict], k: int, cache: bool = True) -> list[tuple[str, float]]:
        """The ``k`` likeliest first tokens of the reply to ``messages`` with their log-probabilities,
        likeliest first; a JudgeError if the endpoint returns none (not every server or model does)."""
        request = {"model": self.model, "messages": messages, "temperature": self.temperature, "max_tokens": 1,
                   "logprobs": True, "top_logprobs": k}
        return [(token, logprob) for token, logprob in self._answer(request, self._first_token_logprobs, cache)]

    def _answer(self, request: dict, read: Callable, cache: bool = True):
        """What ``read`` takes from the reply to ``request``: from the cache if it has it, else asked and kept."""
        path = self._cache_path(request) if cache else None
        if path is not None:
            cached = _read_cached(path)
            if cached is not None:
                self._count("cache_hits")
                return cached
        answer = read(self._post(request))
        if path is not None:
            with storage.open_file(path, "w") as f:
                json.dump({"request": _summary(request), "response": answer}, f)
        return answer

    def _cache_path(self, request: dict) -> str | None:
        if self.cache_dir is None:
            return None
        key = cache_key(request)
        return storage.join(self.cache_dir, key[:2], f"{key}.json")

    def _post(self, request: dict) -> requests.Response:
        last_error, delay = "", 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                log.warning("judge %s: %s; retry %d of %d in %.1f s", self.url, last_error, attempt,
                            self.max_retries, delay)
                self._count("retries")
                time.sleep(delay)
            with self._in_flight:
                self._wait_for_slot()
                self._count("requests")
                try:
                    response = requests.post(self.url, json=request, headers=self._headers, timeout=self.timeout_s)
                except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
                    last_error = f"{type(e).__name__}: {e}"
                    delay = retry_delay(attempt, None, self.backoff_s)
                    continue
                except requests.RequestException as e:  # e.g. a URL with no host: retrying cannot help
                    raise JudgeError(f"judge {self.url}: cannot send the request ({type(e).__name__}: {e})") from e
            status = response.status_code
            if 200 <= status < 300:
                return response
            last_error = f"HTTP {status}: {_error_text(response)}"
            if status == 429 or status >= 500:
                delay = retry_delay(attempt, response.headers.get("Retry-After"), self.backoff_s)
                continue
            raise JudgeError(f"judge {self.url} refused the request ({last_error}){self._hint(status)}")
        raise JudgeError(f"judge {self.url}: no answer after {self.max_retries + 1} attempts; last error: {last_error}")

    def _hint(self, status: int) -> str:
        if status in (401, 403):
            return ": check the API key (api_key)"
        if status == 404:
            return f": check base_url (usually ending in /v1) and that the server serves model {self.model!r}"
        return ""

    def _wait_for_slot(self) -> None:
        """Sleep until this request's turn: turns are ``60 / requests_per_minute`` seconds apart."""
        if self._interval is None:
            return
        with self._rate_lock:
            now = time.monotonic()
            slot = max(now, self._next_slot)
            self._next_slot = slot + self._interval
        time.sleep(slot - now)

    def _choice(self, response: requests.Response) -> dict:
        try:
            data = response.json()
        except ValueError:
            raise JudgeError(f"judge {self.url}: the reply is not JSON: {response.text[:ERROR_TEXT_CHARS]!r}") from None
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices:
            raise JudgeError(f"judge {self.url}: the reply has no choices: {json.dumps(data)[:ERROR_TEXT_CHARS]}")
        return choices[0] if isinstance(choices[0], dict) else {}

    def _content(self, response: requests.Response) -> str:
        choice = self._choice(response)
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            raise JudgeError(f"judge {self.url}: the reply's first choice has no message content "
                             f"(finish_reason {choice.get('finish_reason')!r}): {response.text[:ERROR_TEXT_CHARS]}")
        return content

    def _first_token_logprobs(self, response: requests.Response) -> list[list]:
        """``choices[0].logprobs.content[0].top_logprobs`` as [token, logprob] pairs."""
        logprobs = self._choice(response).get("logprobs")
        content = logprobs.get("content") if isinstance(logprobs, dict) else None
        top = content[0].get("top_logprobs") if isinstance(content, list) and content and isinstance(
            content[0], dict) else None
        if not isinstance(top, list) or not top:
            raise JudgeError(f"judge {self.url}: model {self.model!r} returned no top log-probabilities "
                             f"(the request asked for logprobs): {response.text[:ERROR_TEXT_CHARS]}")
        try:
            return [[str(t["token"]), float(t["logprob"])] for t in top]
        except (KeyError, TypeError, ValueError):
            raise JudgeError(f"judge {self.url}: unreadable top_logprobs: "
                             f"{json.dumps(top)[:ERROR_TEXT_CHARS]}") from None

    def _count(self, name: str) -> None:
        with self._stats_lock:
            self.stats[name] += 1


def _read_cached(path: str) -> str | list | None:
    """The cached answer at ``path``, or None: a missing or unreadable entry (say, one half-written by a
    killed process) is asked again and rewritten."""
    if not storage.exists(path):
        return None
    try:
        with storage.open_file(path, "r") as f:
            entry = json.load(f)
    except (OSError, ValueError):
        return None
    response = entry.get("response") if isinstance(entry, dict) else None
    return response if isinstance(response, str | list) else None


def _summary(request: dict) -> dict:
    """``request`` for the cache entry, each image replaced by its sha256 (the images live elsewhere)."""

    def part(p):
        if isinstance(p, dict) and p.get("type") == "image_url":
            url = p.get("image_url", {}).get("url", "")
            return {"type": "image_url", "sha256": hashlib.sha256(url.encode("utf-8")).hexdigest()}
        return p

    messages = [{**m, "content": [part(p) for p in m["content"]]} if isinstance(m.get("content"), list) else m
                for m in request["messages"]]
    return {**request, "messages": messages}


def _error_text(response: requests.Response) -> str:
    """The server's own words: OpenAI's ``{"error": {"message": ...}}``, vLLM's ``{"message": ...}``, or the body."""
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()[:ERROR_TEXT_CHARS] or "(empty body)"
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict) and (error.get("message") or error.get("detail")):
        return str(error.get("message") or error.get("detail"))[:ERROR_TEXT_CHARS]
    if isinstance(error, str):
        return error[:ERROR_TEXT_CHARS]
    return json.dumps(data)[:ERROR_TEXT_CHARS]
