"""What a replay is asked to do (:class:`ReplayRequest`, the flags of ``agent-monitor replay``), and
the error that stops one."""

from __future__ import annotations

from dataclasses import dataclass, field

from monitor.errors import EXIT_USAGE, MonitorError
from monitor.report import ReplayOptions


class ReplayError(MonitorError):
    """Replay cannot start or continue (missing topic, unreadable policy, ...)."""

    exit_code = EXIT_USAGE


@dataclass
class ReplayRequest:
    """What to replay and how; mirrors the flags of ``agent-monitor replay``."""

    policy: str
    inputs: list[str] = field(default_factory=list)
    out: str = "replay-report.json"
    html: str | None = None
    compare: str | None = None
    engine: str = "incremental"
    keep_denied: bool = False
    verdict_memory: int = 64
    trace_batch: int = 1
    budget_ms: float | None = None
    max_record_bytes: int = 1_000_000
    allow_imports: list[str] = field(default_factory=list)  # --allow-import: the policy sandbox's
    bootstrap_servers: str | None = None
    topic: str | None = None
    from_time: str | None = None
    to_time: str | None = None
    from_offsets: int | dict[int, int] | None = None
    to_offsets: int | dict[int, int] | None = None
    partitions: list[int] | None = None
    publish_prefix: str | None = None
    publish_bootstrap: str | None = None
    progress: bool = True
    shards: int | None = None  # processes evaluating disjoint sessions; None: by input size
    command: list[str] = field(default_factory=list)
    workdir: str | None = None
    created_at: str | None = None

    def options(self) -> ReplayOptions:
        return ReplayOptions(engine=self.engine, keep_denied=self.keep_denied,  # type: ignore[arg-type]
                             verdict_memory=self.verdict_memory, trace_batch=self.trace_batch,
                             budget_ms=self.budget_ms, max_record_bytes=self.max_record_bytes,
                             allow_imports=list(self.allow_imports))
