"""Replay what agents already did through a policy: for audits, incident reviews and policy trials.

Sessions come from trace files (JSON: a list of events, a ``{"session_id", "events"}`` object or a
list of them, a sample session ``{"session_id", "batches": [[...], ...]}``, or EventBatch records;
JSONL: one EventBatch per line; one file or a folder) or from a cluster's events topic between two timestamps or offsets (a consumer that commits nothing and reads
committed records only). Each batch is evaluated exactly as the live worker does it - the same
engine interface, the same :class:`~monitor.state.SessionStore` semantics (a denied batch does not
join the past, a known batch id repeats its verdict) - and nothing is written to production topics.

Memory stays bounded by the open sessions: batches are evaluated as they are read, and per-batch
results go to a temporary SQLite file from which the sorted report is streamed at the end.

The package, one module per concern:

- :mod:`~monitor.replay.request`: what to replay (:class:`ReplayRequest`), :class:`ReplayError`;
- :mod:`~monitor.replay.sources`: where batches come from (:class:`FileSource`, :class:`KafkaSource`);
- :mod:`~monitor.replay.evaluate`: each batch decided by the worker's own code (:class:`ReplayEvaluator`);
- :mod:`~monitor.replay.tally`: what is counted per session, rule and shard (:class:`RuleTally`);
- :mod:`~monitor.replay.spool`: verdicts and results kept on disk, not in memory;
- :mod:`~monitor.replay.run`: shards, progress and :func:`run_replay`;
- :mod:`~monitor.replay.assemble`: the report put together from the shards, written atomically;
- :mod:`~monitor.replay.evidence`: the text behind a violation's addresses;
- :mod:`~monitor.replay.publish`: verdicts and alerts to topics of the replay's own (``--publish``);
- :mod:`~monitor.replay.verify`: :func:`verify_report`;
- :mod:`~monitor.replay.cli`: ``agent-monitor replay`` and ``agent-monitor verify``.

Command line::

    agent-monitor replay traces/ --policy policies/ --out audit.json --html audit.html
    agent-monitor replay --prefix agent --bootstrap-servers kafka:9092 \\
        --from-time 2026-11-21T00:00:00Z --to-time 2026-11-22T00:00:00Z --policy policies/ -o day.json
    agent-monitor replay traces/ --policy live.gr --compare candidate.gr -o trial.json --html trial.html
    agent-monitor replay --prefix agent --policy live.gr --publish audit-2026-11-22   # own topics
    agent-monitor verify audit.json        # exit 0 iff inputs, policy and every verdict are the same

Example (files)::

    >>> import json, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "s1.json").write_text(json.dumps([{"role": "user", "content": "please send it"},
    ...     {"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
    ...      "function": {"name": "send_email", "arguments": {}}}]}]))
    >>> _ = (d / "p.gr").write_text('raise "no" if:\\n    (m: Message) -> (t: ToolCall)\\n'
    ...     '    "send" in m.content\\n    t is tool:send_email\\n')
    >>> res = run_replay(ReplayRequest(inputs=[str(d / "s1.json")], policy=str(d / "p.gr"),
    ...                                out=str(d / "r.json"), engine="reference", progress=False))
    >>> res.report.totals.decisions
    {'allow': 1, 'deny': 1}
    >>> verify_report(d / "r.json").ok
    True
"""

from monitor.replay.cli import register_cli
from monitor.replay.evaluate import ReplayedBatch, ReplayEvaluator
from monitor.replay.evidence import evidence_for
from monitor.replay.request import ReplayError, ReplayRequest
from monitor.replay.run import ReplayResult, evaluate_shard, fewer_collections, run_replay
from monitor.replay.sources import (
    FileSource,
    Item,
    KafkaSource,
    Source,
    discover_files,
    line_session_id,
    open_source,
    parse_offsets,
    parse_time,
    shard_of,
)
from monitor.replay.spool import ResultStore, VerdictSpill
from monitor.replay.tally import RuleTally, SessionTally, ShardSummary, Tally
from monitor.replay.verify import VerifyResult, verify_report

__all__ = [
    "FileSource",
    "Item",
    "KafkaSource",
    "ReplayError",
    "ReplayEvaluator",
    "ReplayRequest",
    "ReplayResult",
    "ReplayedBatch",
    "ResultStore",
    "RuleTally",
    "SessionTally",
    "ShardSummary",
    "Source",
    "Tally",
    "VerdictSpill",
    "VerifyResult",
    "discover_files",
    "evaluate_shard",
    "evidence_for",
    "fewer_collections",
    "line_session_id",
    "open_source",
    "parse_offsets",
    "parse_time",
    "register_cli",
    "run_replay",
    "shard_of",
    "verify_report",
]
