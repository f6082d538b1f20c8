"""The FastAPI application behind ``agent-monitor serve`` (OpenAPI at ``/openapi.json``, Swagger UI
at ``/docs``).

Endpoints (see :mod:`monitor.api.models` for the bodies):

====================================================  ===============================================
``POST /api/policy/analyze``                          invariant-server: the whole trace
``POST /api/monitor/check``                           invariant-server: pending events given the past
``POST /api/v1/policy/check``                         invariant-ai ``RemotePolicy.analyze``
``POST /api/v1/policy/load``                          invariant-ai ``RemotePolicy.preload``
``POST /api/v1/sessions/{session_id}/batches``        publish a batch to Kafka; ``wait=true``: its verdict
``GET /api/v1/sessions/{session_id}/verdicts``        the session's recent verdicts
``GET /healthz``                                      liveness (no key needed)
====================================================  ===============================================

Example (a server on loopback without keys; a real deployment keeps the keys)::

    import uvicorn
    from monitor.api.app import ServeSettings, create_app
    app = create_app(ServeSettings(no_auth=True, allow_policy_text=True, sessions=False))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from monitor import __version__, sandbox
from monitor.api.analysis import Analyzer, CheckFailed, CompiledPolicy, PolicyCache
from monitor.api.models import (
    MAX_ID_CHARS,
    AnalysisError,
    AnalyzeRequest,
    AnalyzeResponse,
    BatchRequest,
    BatchResult,
    ErrorBody,
    ErrorCode,
    Health,
    MonitorCheckRequest,
    PolicyCheckRequest,
    PolicyCheckResponse,
    PolicyLoadRequest,
    PolicyLoadResponse,
    RemoteError,
    SessionVerdicts,
)
from monitor.api.security import ApiKeys, Guard, RateLimiter
from monitor.config import DEFAULT_PREFIX, WorkerSettings, env_bootstrap
from monitor.errors import MonitorError
from monitor.models import EventBatch, Match, plain_events
from monitor.policy import PolicyLoadError, load_policy_set

log = logging.getLogger("agent_monitor.api")

SETTINGS_ENV = "AGENT_MONITOR_SERVE_SETTINGS"  # JSON ServeSettings for `serve --workers N`
INPUT_PHRASE = "Input Validation Error: "  # RemotePolicy raises InvariantInputValidationError on it

STATUS_CODES: dict[int, ErrorCode] = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                413: "too_large", 422: "policy_error", 429: "rate_limited", 500: "internal",
                503: "unavailable", 504: "verdict_timeout"}


class ServeSettings(BaseModel):
    """How ``agent-monitor serve`` runs; flags map one to one."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    policy_path: str | None = Field(default=None, description=(
        "policy file or folder served by id (policy_id) and by its exact text"))
    allow_policy_text: bool = Field(default=False, description=(
        "run policy text sent in requests (in the policy sandbox, as every policy: see monitor.sandbox)"))
    allow_imports: list[str] = Field(default_factory=list, description=(
        "imports the policy sandbox allows beyond invariant's builtins and detectors (--allow-import)"))
    api_keys_file: str | None = None
    no_auth: bool = Field(default=False, description="no API keys (only on a loopback host)")
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_events: int = Field(default=2000, ge=1, description="events per request (past + pending)")
    rate_limit: float = Field(default=50.0, gt=0, description="requests per second per API key")
    rate_burst: int = Field(default=100, ge=1)
    cors_origins: list[str] = Field(default_factory=list, description="CORS is off when empty")
    policy_cache: int = Field(default=64, ge=1, description="compiled request policies kept")
    # the worker's limits, the same for stateless checks
    budget_ms: float | None = Field(default=5000.0, gt=0)
    max_record_bytes: int = Field(default=1_000_000, ge=1024)
    max_verdict_violations: int = Field(default=200, ge=1)
    verdict_memory: int = Field(default=64, ge=1)
    # the session-aware path
    sessions: bool = Field(default=True, description="serve the Kafka-backed session endpoints")
    bootstrap_servers: str = Field(default_factory=env_bootstrap)
    topic_prefix: str = Field(default_factory=lambda: os.environ.get("AGENT_MONITOR_PREFIX", DEFAULT_PREFIX))
    max_wait_s: float = Field(default=60.0, gt=0, description="longest wait=true a request may ask for")
    verdict_backfill: int = Field(default=1000, ge=0, description="verdicts read back per partition at start")
    connect_timeout: float = Field(default=10.0, gt=0)

    def worker(self) -> WorkerSettings:
        return WorkerSettings(policy_path=self.policy_path or "-", budget_ms=self.budget_ms,
                              max_record_bytes=self.max_record_bytes,
                              max_verdict_violations=self.max_verdict_violations,
                              verdict_memory=self.verdict_memory, allow_imports=self.allow_imports,
                              bootstrap_servers=self.bootstrap_servers, topic_prefix=self.topic_prefix)


class ApiError(MonitorError):
    """An answer in the :class:`ErrorBody` shape."""

    def __init__(self, status: int, code: ErrorCode, detail: str, where: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.where, self.headers = status, code, detail, where, headers


def _error(status: int, code: ErrorCode, detail: str, where: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorBody(error=code, detail=detail, where=where).model_dump(), status, headers)


def _where(loc: tuple | list) -> str:
    return ".".join(str(p) for p in loc) or "body"


def _validation_detail(errors: Sequence[Mapping[str, Any]], limit: int = 5) -> str:
    parts = [f"{_where(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors[:limit]]
    more = len(errors) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


SessionId = Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS, description="the session's id")]

ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorBody} for status in (400, 401, 413, 422, 429)}
SESSION_ERRORS = {**ERRORS, 503: {"model": ErrorBody}, 504: {"model": ErrorBody}}


def create_app(settings: ServeSettings | None = None, keys: ApiKeys | None = None) -> FastAPI:
    """The application; ``keys`` default to ``settings.api_keys_file`` and ``AGENT_MONITOR_API_KEYS``
    (none with ``no_auth``). Raises :class:`PolicyLoadError` for operator policies that do not parse,
    ``ValueError`` for settings that cannot be served safely."""
    settings = settings or ServeSettings()
    if settings.no_auth:
        keys = None
    else:
        keys = keys if keys is not None else ApiKeys.load(settings.api_keys_file)
        if not len(keys):
            raise ValueError("no API keys: give --api-keys FILE or set AGENT_MONITOR_API_KEYS "
                             "(NAME:SHA256 entries; `agent-monitor serve --new-key NAME` makes one), "
                             "or --no-auth on a loopback host")
    sandbox.set_allowed_imports(settings.allow_imports)  # for the operator's and requests' policies
    sandbox.install_guard()
    worker = settings.worker()
    cache = PolicyCache(settings.policy_cache)
    analyzer = Analyzer(worker, cache)
    served: dict[str, CompiledPolicy] = {}
    if settings.policy_path:
        pset = load_policy_set(settings.policy_path)
        for policy in pset.all():
            compiled = CompiledPolicy.of(policy)
            compiled.served_as.append(policy.policy_id)
            served[policy.policy_id] = compiled
            cache.pin(compiled)
    state: dict[str, Any] = {"gateway": None}

    app = FastAPI(
        title="agent-monitor",
        version=__version__,
        summary="Invariant guardrail policies over HTTP: invariant-server and invariant-ai "
                "compatible checks, and the stateful Kafka monitor for agents that speak HTTP.",
        description=(
            "Authenticate with `Authorization: Bearer <API key>`. Every error answers one shape, "
            "`ErrorBody` `{error, detail, where}`: 400 invalid request or policy, 401 no or a bad "
            "key, 413 body too large, 422 the policy failed or ran out of time (fail closed), "
            "429 rate limited (Retry-After), 503 Kafka unavailable, 504 no verdict in time."),
        lifespan=_lifespan(settings, state, analyzer),
    )
    app.state.settings = settings
    app.state.analyzer = analyzer
    app.state.served = served

    _install_error_handlers(app)

    async def resolve(text: str | None, policy_id: str | None) -> CompiledPolicy:
        if policy_id is not None:
            found = served.get(policy_id)
            if found is None:
                known = ", ".join(sorted(served)) or "none"
                raise ApiError(400, "unknown_policy", f"unknown policy {policy_id!r} (this server "
                               f"serves: {known})", "body.policy_id")
            return found
        if text is None:
            raise ApiError(400, "bad_request", "a policy is required: 'policy' (text) or 'policy_id'",
                           "body.policy")
        from monitor.policy import sha256_text

        pinned = cache.pinned(sha256_text(text))
        if pinned is not None:
            return pinned
        if not settings.allow_policy_text:
            known = ", ".join(sorted(served)) or "none"
            raise ApiError(400, "policy_text_refused", (
                "this server runs no policy text from requests: a policy is code (an operator may "
                "allow it with --allow-policy-text; it then runs in the policy sandbox). "
                f"It serves these policies, by 'policy_id' or by their exact text: {known}"),
                "body.policy")
        try:
            return await cache.compile(text)
        except PolicyLoadError as exc:
            raise ApiError(400, "policy_invalid", str(exc),
                           f"policy:{exc.line}" if exc.line else "body.policy") from None

    _install_policy_routes(app, settings, analyzer, resolve)
    _install_session_routes(app, settings, state)

    @app.get("/healthz", response_model=Health, tags=["ops"], summary="Liveness (no key needed)")
    async def healthz() -> Health:
        gw = state["gateway"]
        return Health(version=__version__, policies=sorted(served),
                      sessions="off" if not settings.sessions else (gw.state if gw else "starting"))

    _install_middleware(app, settings, keys)
    return app


def _lifespan(settings: ServeSettings, state: dict[str, Any],
              analyzer: Analyzer) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """What runs around serving: the session gateway started (when Kafka answers), then closed
    with the analyzer."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.sessions:
            from monitor.api.sessions import SessionGateway

            gateway = SessionGateway(settings.bootstrap_servers, settings.topic_prefix,
                                     verdict_memory=settings.verdict_memory,
                                     backfill=settings.verdict_backfill,
                                     connect_timeout=settings.connect_timeout)
            state["gateway"] = gateway
            try:  # now if Kafka answers; otherwise on the first session request
                await gateway.start()
            except Exception as exc:  # noqa: BLE001 - the stateless endpoints work without Kafka
                log.warning("session endpoints unavailable until Kafka answers: %s", exc)
        try:
            yield
        finally:
            if state["gateway"] is not None:
                state["gateway"].close()
            analyzer.close()

    return lifespan

def _headers(compiled: CompiledPolicy, started: float, omitted: int) -> dict[str, str]:
    return {"X-Policy-Sha256": compiled.policy.sha256,
            "X-Eval-Ms": f"{(time.perf_counter() - started) * 1000:.3f}",
            "X-Errors-Omitted": str(omitted)}


def _failed(exc: CheckFailed) -> ApiError:
    status = 400 if exc.code in ("missing_parameter", "excessive_policy", "attribute_error",
                                 "input_invalid") else 422
    return ApiError(status, exc.code, exc.detail, "body.policy")


def _analysis_errors(matches: list[Match]) -> list[AnalysisError]:
    return [AnalysisError.of(m.rule_index, m.message, m.key, m.addresses, m.kwargs) for m in matches]


def _install_policy_routes(app: FastAPI, settings: ServeSettings, analyzer: Analyzer,
                           resolve: Callable[[str | None, str | None], Awaitable[CompiledPolicy]]) -> None:
    """The stateless checks: invariant-server's endpoints and invariant-ai's ``RemotePolicy``'s."""

    def bound_events(*groups: tuple[str, list]) -> None:
        total = sum(len(events) for _, events in groups)
        if total > settings.max_events:
            raise ApiError(400, "bad_request", f"{total} events in one request; the limit is "
                           f"{settings.max_events} (serve --max-events)", f"body.{groups[-1][0]}")

    def capped(matches: list[Match]) -> tuple[list[Match], int]:
        cap = settings.max_verdict_violations
        return matches[:cap], max(0, len(matches) - cap)

    # -- invariant-server -------------------------------------------------------------------

    @app.post("/api/policy/analyze", response_model=AnalyzeResponse, responses=ERRORS,
              tags=["invariant-server"], summary="Analyze a whole trace against a policy")
    async def policy_analyze(body: AnalyzeRequest) -> JSONResponse:
        """invariant-server's analyze: every violation in the trace. ``errors`` items keep
        invariant-server's ``error`` and ``ranges`` and add the structured fields."""
        started = time.perf_counter()
        bound_events(("trace", body.trace))
        compiled = await resolve(body.policy, body.policy_id)
        try:
            matches = await analyzer.analyze(compiled, plain_events(body.trace))
        except CheckFailed as exc:
            raise _failed(exc) from None
        shown, omitted = capped(matches)
        out = AnalyzeResponse(errors=_analysis_errors(shown), errors_omitted=omitted)
        return JSONResponse(out.model_dump(mode="json"), headers=_headers(compiled, started, omitted))

    @app.post("/api/monitor/check", response_model=list[AnalysisError], responses=ERRORS,
              tags=["invariant-server"], summary="Check pending events given the past")
    async def monitor_check(body: MonitorCheckRequest) -> JSONResponse:
        """invariant-server's monitor check: a JSON list with one item per violation that binds a
        pending event (invariant-server listed ``repr`` strings; each item here has that string as
        ``error``, plus the structured fields). An empty list: the pending events may proceed."""
        started = time.perf_counter()
        bound_events(("past_events", body.past_events), ("pending_events", body.pending_events))
        if not body.pending_events:
            raise ApiError(400, "bad_request", "pending_events is empty: nothing to check",
                           "body.pending_events")
        compiled = await resolve(body.policy, body.policy_id)
        try:
            matches = await analyzer.check(compiled, plain_events(body.past_events), plain_events(body.pending_events))
        except CheckFailed as exc:
            raise _failed(exc) from None
        shown, omitted = capped(matches)
        return JSONResponse([e.model_dump(mode="json") for e in _analysis_errors(shown)],
                            headers=_headers(compiled, started, omitted))

    # -- invariant-ai RemotePolicy ----------------------------------------------------------

    @app.post("/api/v1/policy/check", response_model=PolicyCheckResponse, responses=ERRORS,
              tags=["invariant-ai"], summary="invariant-ai RemotePolicy.analyze")
    async def policy_check(body: PolicyCheckRequest) -> JSONResponse:
        """What invariant-ai's ``RemotePolicy`` posts (``INVARIANT_API_ENDPOINT`` pointing here):
        ``{"errors": [{key, args, kwargs, ranges}]}``. A 400's ``detail`` carries invariant's error
        kind (``Missing Policy Parameter: ``, ``Input Validation Error: ``, ...); a policy that
        raised otherwise answers 422 with ``Error during analysis: ...`` (PolicyExecutionError)."""
        started = time.perf_counter()
        bound_events(("messages", body.messages))
        compiled = await resolve(body.policy, None)
        try:
            matches = await analyzer.analyze(compiled, plain_events(body.messages), body.parameters)
        except CheckFailed as exc:
            raise _failed(exc) from None
        shown, omitted = capped(matches)
        out = PolicyCheckResponse(errors=[RemoteError(key=m.key, args=[m.message], kwargs=m.kwargs,
                                                      ranges=m.addresses) for m in shown],
                                  errors_omitted=omitted)
        return JSONResponse(out.model_dump(mode="json"), headers=_headers(compiled, started, omitted))

    @app.post("/api/v1/policy/load", response_model=PolicyLoadResponse, responses=ERRORS,
              tags=["invariant-ai"], summary="invariant-ai RemotePolicy.preload")
    async def policy_load(body: PolicyLoadRequest) -> PolicyLoadResponse:
        """Parse and compile a policy (then cached by sha256); a 400 names the line that fails."""
        compiled = await resolve(body.policy, None)
        return PolicyLoadResponse(policy_sha256=compiled.policy.sha256, rules=compiled.rules,
                                  incremental_rules=compiled.incremental_rules)


def _install_error_handlers(app: FastAPI) -> None:
    """Every error in one shape, :class:`ErrorBody`."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.detail, exc.where, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        first = errors[0].get("loc", ("body",)) if errors else ("body",)
        detail = _validation_detail(errors)
        if request.url.path == "/api/v1/policy/check" and tuple(first[:2]) == ("body", "messages"):
            # invariant-ai's RemotePolicy raises InvariantInputValidationError on this phrase
            return _error(400, "input_invalid", INPUT_PHRASE + detail, _where(first))
        return _error(400, "bad_request", detail, _where(first))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = STATUS_CODES.get(exc.status_code, "bad_request" if exc.status_code < 500 else "internal")
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            detail = f"no endpoint {request.method} {request.url.path} (see /docs)"
        return _error(exc.status_code, code, detail, "body" if exc.status_code in (400, 413) else None,
                      getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, "internal", f"the server failed on this request ({type(exc).__name__}); "
                                       "the log has the details")


def _install_session_routes(app: FastAPI, settings: ServeSettings, state: dict[str, Any]) -> None:
    """The session endpoints, through Kafka (``state["gateway"]``: the lifespan starts it)."""

    async def gateway():
        gw = state["gateway"]
        if gw is None:
            raise ApiError(404, "not_found", "this server runs without the session endpoints "
                           "(started with --no-sessions)")
        from monitor.client import BrokerUnreachable, MonitorError

        try:
            await gw.start()
        except (BrokerUnreachable, MonitorError) as exc:
            raise ApiError(503, "unavailable", f"Kafka is not available: {exc}",
                           headers={"Retry-After": "5"}) from None
        return gw

    @app.post("/api/v1/sessions/{session_id}/batches", response_model=BatchResult,
              responses=SESSION_ERRORS, tags=["sessions"], status_code=200,
              summary="Publish a batch of a session; wait=true returns the worker's verdict")
    async def post_batch(session_id: SessionId, body: BatchRequest,
                         wait: bool = Query(False, description="wait for the worker's verdict"),
                         timeout: float = Query(30.0, gt=0, description="seconds to wait (wait=true)"),
                         ) -> JSONResponse:
        """Publishes an EventBatch keyed by ``session_id`` to ``<prefix>.events``, where the
        workers keep the session's past. ``wait=true`` answers 200 with the verdict (a 504 means
        none came in time: retry with the same ``batch_id``, which the worker answers once);
        otherwise 202 once Kafka acknowledged the record."""
        from monitor.client import BrokerUnreachable, MonitorError, PublishError, VerdictTimeout

        if timeout > settings.max_wait_s:
            raise ApiError(400, "bad_request", f"timeout {timeout:g} s is over the limit of "
                           f"{settings.max_wait_s:g} s", "query.timeout")
        try:
            batch = EventBatch(session_id=session_id, batch_id=body.batch_id or uuid.uuid4().hex,
                               seq=body.seq, end_session=body.end_session, events=list(body.events),
                               policy=body.policy, metadata=body.metadata)
        except ValidationError as exc:
            errors = exc.errors()
            raise ApiError(400, "bad_request", _validation_detail(errors),
                           "body." + _where(errors[0]["loc"]) if errors else "body") from None
        size = len(batch.model_dump_json())
        if size > settings.max_record_bytes:
            raise ApiError(413, "too_large", f"the batch record would be {size} bytes; the worker "
                           f"takes at most {settings.max_record_bytes}", "body.events")
        gw = await gateway()
        try:
            verdict = await gw.submit(batch, wait, timeout)
        except VerdictTimeout as exc:
            raise ApiError(504, "verdict_timeout", f"{exc} Retry with batch_id {batch.batch_id!r}.",
                           headers={"X-Batch-Id": batch.batch_id}) from None
        except (BrokerUnreachable, PublishError, MonitorError) as exc:
            raise ApiError(503, "unavailable", f"the batch was not published: {exc}",
                           headers={"Retry-After": "5", "X-Batch-Id": batch.batch_id}) from None
        out = BatchResult(session_id=session_id, batch_id=batch.batch_id, topic=gw.topics.events,
                          verdict=verdict)
        return JSONResponse(out.model_dump(mode="json"), status_code=200 if wait else 202)

    @app.get("/api/v1/sessions/{session_id}/verdicts", response_model=SessionVerdicts,
             responses=SESSION_ERRORS, tags=["sessions"], summary="A session's recent verdicts")
    async def get_verdicts(session_id: SessionId,
                           limit: int = Query(None, ge=1, description="at most this many, newest kept"),
                           ) -> SessionVerdicts:
        """The session's last verdicts (at most ``verdict_memory`` per session, oldest first), as
        this server read them from ``<prefix>.verdicts``: since it started, plus the last
        ``verdict_backfill`` records of each partition before that."""
        gw = await gateway()
        return SessionVerdicts(session_id=session_id, verdicts=gw.recent.get(session_id, limit),
                               note=(f"verdicts read from {gw.topics.verdicts} since this server "
                                     f"started, and up to {settings.verdict_backfill} records per "
                                     f"partition before; at most {settings.verdict_memory} per session"))


def _install_middleware(app: FastAPI, settings: ServeSettings, keys: ApiKeys | None) -> None:
    """The guard (API keys, body limit, rate limit) and, when configured, CORS."""
    # outermost last: CORS answers preflights before the guard asks for a key
    app.add_middleware(Guard, keys=keys,
                       limiter=RateLimiter(settings.rate_limit, settings.rate_burst),
                       max_body_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["X-Policy-Sha256", "X-Eval-Ms", "X-Errors-Omitted",
                                           "X-Batch-Id", "Retry-After"])


def app_from_env() -> FastAPI:
    """The app for ``uvicorn --factory`` (``serve --workers N``): settings from
    ``AGENT_MONITOR_SERVE_SETTINGS``."""
    return create_app(ServeSettings.model_validate_json(os.environ.get(SETTINGS_ENV, "{}")))
