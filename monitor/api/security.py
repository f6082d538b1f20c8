"""Who may call the HTTP API, how much, and how big: bearer API keys (stored hashed), a request
body limit, a per-key rate limit. All three are decided in one ASGI middleware before the body is
read, so an unauthenticated or throttled client costs no parsing.

API keys are random strings the operator hands out; the server keeps only their sha256 (enough
for 256-bit random keys: no password-style stretching is needed). A key file holds one
``NAME:SHA256HEX`` per line (``#`` comments); ``AGENT_MONITOR_API_KEYS`` holds the same entries
separated by commas or whitespace. ``agent-monitor serve --new-key NAME`` prints a new key and
its line.

Example::

    >>> from monitor.api.security import ApiKeys, new_key
    >>> key, line = new_key("ci")
    >>> keys = ApiKeys.parse(line, origin="example")
    >>> keys.verify(key), keys.verify("wrong")
    ('ci', None)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException

from monitor.errors import MonitorError

KEYS_ENV = "AGENT_MONITOR_API_KEYS"
KEY_PREFIX = "amk_"
_ENTRY = re.compile(r"^(?:(?P<name>[A-Za-z0-9_.@-]{1,64}):)?(?:sha256:)?(?P<hash>[0-9a-fA-F]{64})$")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class KeyFileError(MonitorError, ValueError):
    """A key file or entry that cannot be used; the message names the file and line."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(name: str) -> tuple[str, str]:
    """A new random API key and the ``NAME:SHA256`` line the server stores for it."""
    if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", name):
        raise KeyFileError(f"a key name is 1-64 letters, digits or _.@- (got {name!r})")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, f"{name}:{hash_key(key)}"


class ApiKeys:
    """The accepted keys, by the sha256 of the key."""

    def __init__(self, names_by_hash: dict[str, str] | None = None) -> None:
        self.names_by_hash = dict(names_by_hash or {})

    def __len__(self) -> int:
        return len(self.names_by_hash)

    @classmethod
    def parse(cls, text: str, origin: str, separators: str = "\n") -> "ApiKeys":
        out: dict[str, str] = {}
        entries: Iterable[tuple[int, str]]
        if separators == "\n":
            entries = enumerate(text.splitlines(), 1)
        else:
            entries = enumerate(re.split(r"[\s,]+", text), 1)
        for n, raw in entries:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            m = _ENTRY.match(line)
            if not m:
                raise KeyFileError(
                    f"{origin}:{n}: expected NAME:SHA256HEX (the sha256 of the key, never the key "
                    f"itself; `agent-monitor serve --new-key NAME` makes one), got {line[:20]!r}...")
            digest = m.group("hash").lower()
            out[digest] = m.group("name") or f"key-{digest[:8]}"
        return cls(out)

    @classmethod
    def load(cls, path: str | Path | None = None, env: str | None = None) -> "ApiKeys":
        """Keys from a file and/or the environment (``AGENT_MONITOR_API_KEYS`` by default)."""
        keys = cls()
        if path:
            try:
                text = Path(path).read_text()
            except OSError as exc:
                raise KeyFileError(f"{path}: cannot read the API key file: {exc.strerror}") from None
            keys.names_by_hash.update(cls.parse(text, str(path)).names_by_hash)
        value = os.environ.get(KEYS_ENV) if env is None else env
        if value:
            keys.names_by_hash.update(cls.parse(value, f"${KEYS_ENV}", separators=",").names_by_hash)
        return keys

    def verify(self, key: str) -> str | None:
        """The key's name, or None. (A dict lookup by the key's sha256: timing reveals nothing
        about a key an attacker does not already know.)"""
        return self.names_by_hash.get(hash_key(key))


class RateLimiter:
    """A token bucket per client: ``rate`` requests per second, bursts up to ``burst``.

    >>> rl = RateLimiter(rate=1, burst=2)
    >>> [rl.take("k", now=0.0) for _ in range(3)]
    [0.0, 0.0, 1.0]
    >>> rl.take("k", now=1.0)
    0.0
    """

    def __init__(self, rate: float, burst: int, max_clients: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients  # bounded: the oldest bucket goes first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str, now: float | None = None) -> float:
        """0 when the request may go on, else the seconds until it could."""
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._store(client, (tokens - 1.0, now))
            return 0.0
        self._store(client, (tokens, now))
        return (1.0 - tokens) / self.rate

    def _store(self, client: str, value: tuple[float, float]) -> None:
        self._buckets[client] = value
        self._buckets.move_to_end(client)
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)


class BodyTooLarge(HTTPException, MonitorError):
    """Raised from ``receive`` once a body passes the limit (an HTTPException, so that FastAPI's
    body reading lets it through to the error handler instead of calling it a parse error)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over the limit of {limit} bytes "
                              "(serve --max-body-bytes)")


def error_response(status: int, code: str, detail: str, where: str | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """An :class:`~monitor.api.models.ErrorBody` answer as raw ASGI parts."""
    body = json.dumps({"error": code, "detail": detail, "where": where}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return status, hdrs, body


async def _send_error(send: Send, parts: tuple[int, list[tuple[bytes, bytes]], bytes]) -> None:
    status, headers, body = parts
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: body limit, then API key, then rate limit, for every path but the open
    ones (``/docs``, ``/openapi.json``, ``/healthz``).

    The authenticated key's name is put in ``scope["state"]["api_key"]``.
    """

    OPEN = ("/docs", "/docs/oauth2-redirect", "/openapi.json", "/healthz", "/redoc")

    def __init__(self, app: ASGIApp, keys: ApiKeys | None, limiter: RateLimiter | None,
                 max_body_bytes: int) -> None:
        self.app = app
        self.keys = keys  # None: no authentication (serve --no-auth, loopback only)
        self.limiter = limiter
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path in self.OPEN:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                await _send_error(send, error_response(400, "bad_request", "Content-Length is not a number",
                                                       "header Content-Length"))
                return
            if int(length) > self.max_body_bytes:
                await _send_error(send, self._too_large(int(length)))
                return
        client = "anonymous"
        if self.keys is not None:
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            name = self.keys.verify(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
            if name is None:
                detail = ("an API key is required: send 'Authorization: Bearer <key>'" if not auth
                          else "the API key is not valid (or the header is not 'Bearer <key>')")
                await _send_error(send, error_response(401, "unauthorized", detail, "header Authorization",
                                                       {"WWW-Authenticate": 'Bearer realm="agent-monitor"'}))
                return
            client = name
        elif scope.get("client"):
            client = f"ip:{scope['client'][0]}"
        scope.setdefault("state", {})["api_key"] = client
        if self.limiter is not None:
            wait = self.limiter.take(client)
            if wait > 0:
                retry = max(1, math.ceil(wait))
                await _send_error(send, error_response(
                    429, "rate_limited", f"over {self.limiter.rate:g} requests/s for {client!r} "
                    f"(bursts of {self.limiter.burst}): retry in {retry} s", None,
                    {"Retry-After": str(retry)}))
                return
        received = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            # a chunked body with no Content-Length went past the limit while being read
            if not started:
                await _send_error(send, self._too_large(None))

    def _too_large(self, size: int | None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        what = f"{size} bytes" if size is not None else "over the limit"
        return error_response(413, "too_large", f"the request body is {what}; the limit is "
                              f"{self.max_body_bytes} bytes (serve --max-body-bytes)", "body")
