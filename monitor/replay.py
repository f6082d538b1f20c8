"""Replay what agents already did through a policy: for audits, incident reviews and policy trials.

Sessions come from trace files (JSON: a list of events, a ``{"session_id", "events"}`` object or a
list of them, a sample session ``{"session_id", "batches": [[...], ...]}``, or EventBatch records; JSONL: one EventBatch per line; one file or a folder) or from a
cluster's events topic between two timestamps or offsets (a consumer that commits nothing and reads
committed records only). Each batch is evaluated exactly as the live worker does it - the same
engine interface, the same :class:`~monitor.state.SessionStore` semantics (a denied batch does not
join the past, a known batch id repeats its verdict) - and nothing is written to production topics.

Memory stays bounded by the open sessions: batches are evaluated as they are read, and per-batch
results go to a temporary SQLite file from which the sorted report is streamed at the end.

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

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import heapq
import json
import marshal
import multiprocessing as mp
import os
import pickle
import re
import resource
import sqlite3
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from monitor.errors import EXIT_USAGE, MonitorError
from monitor.models import Alert, EventBatch, SourceRef, Verdict
from monitor.policy import PolicySet, load_policy_set, policy_files
from monitor.report import (
    TEXT_LIMIT,
    BadInput,
    BatchChange,
    BatchResult,
    CompareResult,
    Counts,
    Evidence,
    InputFile,
    Inputs,
    KafkaInput,
    Manifest,
    PartitionRange,
    PolicyRef,
    ReplayOptions,
    Report,
    RuleTotal,
    SessionChange,
    SessionResult,
    Totals,
    now_iso,
    render_html,
    session_text,
    versions,
    violation_line,
    write_report,
)
from monitor.state import SessionStore
from monitor.core import LONE_SURROGATE, TOO_DEEP, BatchEvaluator, Rejected, decode_batch, is_unicode, joins_past

TRACE_SUFFIXES = (".json",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")


# ============================================================================ sources


@dataclass(slots=True)
class Item:
    """One batch read from a source, or one piece of bad input."""

    where: str
    batch: EventBatch | None = None
    bad: BadInput | None = None
    raw: bytes | None = None  # the record as read (JSONL line, Kafka value), kept for evidence
    ref: SourceRef | None = None
    rejected: Any = None  # monitor.core.Rejected: the worker still denies it if it has ids
    # a rejected record's deny is remembered in its session's state (as the worker does when the
    # record's key is its session id: the state lives on that key's partition), else only sent
    remember: bool = True


def _reason(exc: ValidationError) -> str:
    errs = exc.errors(include_url=False)
    if errs and errs[0].get("type") == "json_invalid":
        return f"not JSON: {errs[0].get('ctx', {}).get('error', errs[0]['msg'])}"
    parts = [f"{'.'.join(str(x) for x in e['loc']) or '<record>'}: {e['msg']}" for e in errs[:3]]
    more = f" (+{len(errs) - 3} more)" if len(errs) > 3 else ""
    return "not a valid EventBatch: " + "; ".join(parts) + more


_REPORT_HEAD = b'{"schema": "agent-monitor/replay-report/'


def _is_report(f: Path) -> bool:
    """A replay report (one written into an input folder is no trace, now or when verified)."""
    if f.suffix != ".json":
        return False
    try:
        with f.open("rb") as fh:
            return fh.read(len(_REPORT_HEAD)) == _REPORT_HEAD
    except OSError:
        return False


def discover_files(paths: list[str]) -> list[Path]:
    """The trace files of ``paths``: files as given, folders searched recursively in name order."""
    out: list[Path] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if p.is_dir():
            found = [f for f in p.rglob("*") if f.is_file() and f.suffix in TRACE_SUFFIXES + JSONL_SUFFIXES
                     and not _is_report(f)]
            found.sort(key=lambda f: f.relative_to(p).as_posix())
        else:
            found = [p]  # a missing file is reported as bad input, not a crash
        for f in found:  # a file named twice (a folder and a file in it) is read once
            real = f.resolve()  # however it is spelled (x/../f, a link to its folder)
            if real not in seen:
                seen.add(real)
                out.append(f)
    return out


_SID = re.compile(rb'"session_id"\s*:\s*"([^"\\]*)"')


def line_session_id(line: bytes) -> str | None:
    """The top-level ``session_id`` of a JSON record, cheaply when it is unambiguous.

    >>> line_session_id(b'{"session_id": "s1", "events": []}'), line_session_id(b'not json')
    ('s1', None)
    """
    if line.count(b'"session_id"') == 1:
        m = _SID.search(line)
        if m:
            try:
                return m.group(1).decode()
            except UnicodeDecodeError:
                return None
    try:  # nested or escaped ids: parse it properly
        data = json.loads(line)
    except ValueError:
        return None
    sid = data.get("session_id") if isinstance(data, dict) else None
    return sid if isinstance(sid, str) and sid else None


def _is_event(value: Any) -> bool:
    return isinstance(value, dict) and ("role" in value or "function" in value) and "events" not in value


def _is_container(value: Any) -> bool:
    return isinstance(value, dict) and ("batch_id" in value or "events" in value or "batches" in value)


def _is_event_list(doc: list[Any]) -> bool:
    """A plain trace: events, none of them a session or a batch (a malformed event among them is
    reported on its own, and the rest of the session is still replayed)."""
    return any(_is_event(e) for e in doc) and not any(_is_container(e) for e in doc)


# a lone surrogate as json.loads reads it: a \\udXXX escape, or its UTF-8-style bytes (surrogatepass)
_LONE_SURROGATE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


class FileSource:
    """Batches from trace files, in file order; records each file's sha256 as it reads it.

    A plain trace (a list of events) is one session named after the file; its events become
    batches of ``trace_batch`` events (one per event by default: each step checked as it happened).
    A session that goes on in a later file (the same ``session_id``) goes on numbering its batches.
    """

    def __init__(self, paths: list[str], trace_batch: int = 1, max_record_bytes: int = 1_000_000,
                 shard: tuple[int, int] = (0, 1)) -> None:
        self.shard, self.shards = shard
        self.files = discover_files(paths)
        self.roots = [Path(p) for p in paths]
        self.trace_batch = max(1, trace_batch)
        self.max_record_bytes = max_record_bytes
        self.read: list[InputFile] = []
        self.total = sum(f.stat().st_size for f in self.files if f.is_file())
        self.done = 0
        self._named: dict[str, Path] = {}  # session names taken from file names, and by which file
        self._next: dict[str, int] = {}  # per session read from JSON files: its next batch number
        self._check_text = False  # the file being read has surrogate escapes: check what it holds

    def _session_name(self, f: Path) -> str:
        name = f.stem
        for root in self.roots:
            if root.is_dir():
                try:
                    name = f.relative_to(root).with_suffix("").as_posix()
                    break
                except ValueError:
                    continue
        # two files may share a name (a/s.json and b/s.json given by path): not one session
        path = f.with_suffix("").as_posix()
        cand, k = name, 1
        while self._named.setdefault(cand, f) != f:
            k += 1
            cand = path if k == 2 else f"{path}#{k - 1}"
        return cand

    def __iter__(self) -> Iterator[Item]:
        """The items of this shard's sessions (those of no session: shard 0's)."""
        for f in self.files:
            path = str(f)
            if not is_unicode(path):  # a name no report can hold: say which, readably
                shown = os.fsencode(f).decode("utf-8", "backslashreplace")
                yield from self._mine([Item(shown, bad=BadInput(where=shown, file=shown,
                                                                reason="the file name is not UTF-8: rename it"))])
                continue
            try:
                if f.suffix in JSONL_SUFFIXES:
                    yield from self._jsonl(f, path)  # routes each line before decoding it
                else:
                    yield from self._mine(self._json(f, path))  # every shard parses the file
            except OSError as exc:
                yield from self._mine([Item(path, bad=BadInput(where=path, file=path, reason=f"unreadable: {exc}"))])

    def _mine(self, items: Iterable[Item]) -> Iterator[Item]:
        for item in items:
            if self.shards == 1:
                yield item
                continue
            rej = item.rejected
            sid = item.batch.session_id if item.batch is not None else (rej.session_id if rej is not None else None)
            if shard_of(sid, self.shards) == self.shard:
                yield item

    def _jsonl(self, f: Path, path: str) -> Iterator[Item]:
        h, size = hashlib.sha256(), 0
        with f.open("rb") as fh:
            for lineno, line in enumerate(fh, 1):
                h.update(line)
                size += len(line)
                self.done += len(line)
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                if self.shards > 1 and shard_of(line_session_id(line), self.shards) != self.shard:
                    continue  # another shard decodes it
                try:
                    yield Item(where, batch=decode_batch(None, line.rstrip(b"\r\n"), self.max_record_bytes,
                                                         keyed=False),
                               raw=line)
                except Rejected as rej:
                    yield Item(where, bad=BadInput(where=where, file=path, line=lineno, reason=rej.reason),
                               rejected=rej)
        self.read.append(InputFile(path=path, sha256=h.hexdigest(), bytes=size))

    def _json(self, f: Path, path: str) -> Iterator[Item]:
        data = f.read_bytes()
        self.read.append(InputFile(path=path, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data)))
        self.done += len(data)
        try:
            doc = json.loads(data)
        except RecursionError:
            yield Item(path, bad=BadInput(where=path, file=path, reason=f"not JSON we can read: {TOO_DEEP}"))
            return
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            line = getattr(exc, "lineno", None)
            where = f"{path}:{line}" if line else path
            hint = (" (one JSON value per line is JSON Lines: name the file .jsonl)"
                    if isinstance(exc, json.JSONDecodeError) and exc.msg == "Extra data" else "")
            yield Item(where, bad=BadInput(where=where, file=path, line=line, reason=f"not JSON: {exc}{hint}"))
            return
        self._check_text = (json.detect_encoding(data) not in ("utf-8", "utf-8-sig")
                            or _LONE_SURROGATE_BYTES.search(data) is not None)
        if isinstance(doc, dict):
            doc = [doc]
            single = True
        else:
            single = False
        if not isinstance(doc, list):
            yield Item(path, bad=BadInput(where=path, file=path, reason="expected a list or an object"))
            return
        if doc and _is_event_list(doc):
            yield from self._session(path, path, self._session_name(f), doc, {})
            return
        for i, obj in enumerate(doc):
            where = path if single else f"{path}#{i}"
            if isinstance(obj, dict) and "batch_id" in obj:
                yield self._record(where, path, obj)
            elif isinstance(obj, dict) and isinstance(obj.get("events"), list):
                sid = obj.get("session_id") or (self._session_name(f) + ("" if single else f"#{i}"))
                yield from self._session(path, where, str(sid), obj["events"], obj)
            elif isinstance(obj, dict) and isinstance(obj.get("batches"), list):
                # the project's sample sessions: batches given as they were sent
                sid = str(obj.get("session_id") or (self._session_name(f) + ("" if single else f"#{i}")))
                yield from self._batches(path, where, sid, obj["batches"], obj)
            else:
                yield Item(where, bad=BadInput(where=where, file=path, reason=(
                    "neither an event list, a session object (events or batches) nor an EventBatch")))

    def _item(self, where: str, path: str, fields: dict[str, Any]) -> Item:
        """An EventBatch made here of ``fields`` (from a trace), or the bad input that says why
        it is none."""
        try:
            if self._check_text and not is_unicode(fields):
                reason = LONE_SURROGATE
            else:
                return Item(where, batch=EventBatch.model_validate(fields))
        except ValidationError as exc:
            reason = _reason(exc)
        return Item(where, bad=BadInput(where=where, file=path, reason=reason))

    def _record(self, where: str, path: str, obj: dict[str, Any]) -> Item:
        """An EventBatch in a .json file, taken exactly as the same record in JSONL or on the
        topic: the worker's decoding (size limit, reasons, a deny when its ids can be read)."""
        try:
            try:
                raw = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
            except UnicodeEncodeError:  # a lone surrogate: escaped, decoding refuses it with its reason
                raw = json.dumps(obj, separators=(",", ":")).encode()
        except RecursionError:
            return Item(where, bad=BadInput(where=where, file=path, reason=f"not a valid EventBatch: {TOO_DEEP}"))
        try:
            return Item(where, batch=decode_batch(None, raw, self.max_record_bytes, keyed=False))
        except Rejected as rej:
            return Item(where, bad=BadInput(where=where, file=path, reason=rej.reason), rejected=rej)

    def _numbered(self, sid: str, count: int) -> range:
        """The numbers of a session's next ``count`` batches (it may go on from an earlier file)."""
        first = self._next.get(sid, 0)
        self._next[sid] = first + count
        return range(first, first + count)

    def _batches(self, path: str, where: str, sid: str, batches: list[Any], obj: dict[str, Any]) -> Iterator[Item]:
        for k, n in enumerate(self._numbered(sid, len(batches))):
            # ids as monitor.samples plays them: <session>:<index>, seq = index
            yield self._item(f"{where}#batches[{k}]", path, {
                "session_id": sid, "batch_id": f"{sid}:{n}", "seq": n, "events": batches[k],
                "policy": obj.get("policy"), "metadata": obj.get("metadata") or {},
            })

    def _session(self, path: str, where: str, sid: str, events: list[Any], obj: dict[str, Any]) -> Iterator[Item]:
        step = self.trace_batch
        starts = range(0, len(events), step)
        for i, n in zip(starts, self._numbered(sid, len(starts))):
            fields = {"session_id": sid, "batch_id": str(n), "seq": n, "events": events[i:i + step],
                      "policy": obj.get("policy"), "metadata": obj.get("metadata") or {}}
            item = self._item(f"{where}#events[{i}]", path, fields)
            if item.batch is not None or step == 1:
                yield item
                continue
            # a malformed event is reported on its own, and its batch goes on without it
            good, bad = [], []
            for j, event in enumerate(fields["events"]):
                one = self._item(f"{where}#events[{i + j}]", path, {**fields, "events": [event]})
                if one.batch is not None:
                    good.append(event)
                else:
                    bad.append(one)
            if not bad:  # not an event's fault (the session's metadata, say)
                yield item
                continue
            yield from bad
            if good:
                yield self._item(f"{where}#events[{i}]", path, {**fields, "events": good})


def _parse_time(value: str | None) -> int | None:
    """Milliseconds since the epoch from ``1700000000000`` or an ISO time (UTC if no zone)."""
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


def parse_offsets(value: str | None) -> int | dict[int, int] | None:
    """``"42"`` (every partition) or ``"0:10,1:7"`` (per partition).

    >>> parse_offsets("0:10,1:7")
    {0: 10, 1: 7}
    """
    if value is None:
        return None
    if ":" not in value:
        return int(value)
    return {int(p): int(o) for p, o in (part.split(":") for part in value.split(","))}


class KafkaSource:
    """Committed records of a topic between two timestamps or offsets; commits nothing.

    End offsets are captured when it starts (the high watermarks, which for a read_committed
    consumer stop before an open transaction, or the first offset at ``to_time``), so records
    produced while it runs are not read and a re-run reads the same range. ``shard=(k, n)``: it
    reads the whole range and yields the records of shard ``k``'s sessions only.
    """

    def __init__(self, bootstrap_servers: str, topic: str, *, from_time: str | None = None,
                 to_time: str | None = None, from_offsets: int | dict[int, int] | None = None,
                 to_offsets: int | dict[int, int] | None = None, partitions: list[int] | None = None,
                 max_record_bytes: int = 1_000_000, idle_timeout: float = 30.0,
                 shard: tuple[int, int] = (0, 1)) -> None:
        from confluent_kafka import Consumer

        self.shard, self.shards = shard
        self.bootstrap_servers, self.topic = bootstrap_servers, topic
        self.from_time, self.to_time = from_time, to_time
        self.max_record_bytes = max_record_bytes
        self.idle_timeout = idle_timeout
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"agent-monitor-replay-{uuid.uuid4().hex}",  # throwaway: never joins a real group
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
        })
        self.ranges = self._plan(partitions, _parse_time(from_time), _parse_time(to_time),
                                 from_offsets, to_offsets)
        self.total = sum(r.end - r.start for r in self.ranges)
        self.done = 0

    def _plan(self, only: list[int] | None, t0: int | None, t1: int | None,
              o0: int | dict[int, int] | None, o1: int | dict[int, int] | None) -> list[PartitionRange]:
        from confluent_kafka import TopicPartition

        md = self.consumer.list_topics(self.topic, timeout=15)
        tmd = md.topics.get(self.topic)
        if tmd is None or tmd.error is not None or not tmd.partitions:
            raise ReplayError(f"topic {self.topic!r} not found on {self.bootstrap_servers}"
                              + (f": {tmd.error}" if tmd is not None and tmd.error else ""))
        parts = sorted(tmd.partitions) if only is None else sorted(set(only))
        missing = [p for p in parts if p not in tmd.partitions]
        if missing:
            raise ReplayError(f"topic {self.topic!r} has no partition {', '.join(map(str, missing))} "
                              f"(its partitions are 0..{len(tmd.partitions) - 1})")

        def at_time(p: int, ms: int, high: int) -> int:
            [tp] = self.consumer.offsets_for_times([TopicPartition(self.topic, p, ms)], timeout=15)
            return high if tp.offset < 0 else tp.offset

        def pick(spec: int | dict[int, int] | None, p: int) -> int | None:
            return spec.get(p) if isinstance(spec, dict) else spec

        ranges = []
        for p in parts:
            # a read_committed consumer's high watermark is the last stable offset: the range
            # ends before an open transaction, so the replay neither waits for it nor differs
            # when re-run
            low, high = self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=15)
            start = pick(o0, p)
            start = max(low, start) if start is not None else (at_time(p, t0, high) if t0 is not None else low)
            end = pick(o1, p)
            end = min(high, end) if end is not None else (at_time(p, t1, high) if t1 is not None else high)
            ranges.append(PartitionRange(partition=p, start=start, end=max(start, end)))
        return ranges

    def describe(self) -> KafkaInput:
        return KafkaInput(bootstrap_servers=self.bootstrap_servers, topic=self.topic,
                          partitions=self.ranges, from_time=self.from_time, to_time=self.to_time)

    def __iter__(self) -> Iterator[Item]:
        from confluent_kafka import KafkaError, TopicPartition

        todo = {r.partition: r for r in self.ranges if r.end > r.start}
        if todo:
            self.consumer.assign([TopicPartition(self.topic, p, r.start) for p, r in todo.items()])
        last = time.monotonic()
        try:
            while todo:
                msg = self.consumer.poll(0.5)
                if msg is None:
                    if time.monotonic() - last > self.idle_timeout:
                        raise ReplayError(
                            "no records for %.0fs while partitions %s were not read to their end offsets"
                            % (self.idle_timeout, sorted(todo)))
                    continue
                last = time.monotonic()
                p = msg.partition()
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        # read_committed: the end may be a transaction marker, never delivered
                        if p in todo and msg.offset() >= todo[p].end:
                            del todo[p]
                        continue
                    raise ReplayError(f"reading {self.topic}[{p}]: {err}")
                r = todo.get(p)
                off = msg.offset()
                if r is None or off >= r.end:
                    todo.pop(p, None)
                    continue
                r.records += 1
                self.done = sum(x.records for x in self.ranges)
                if self.shards > 1:
                    # a session's shard by the session id the record names (a record keyed by
                    # another id sits on another partition, but its deny is the session's)
                    value, key = msg.value(), msg.key()
                    route = (line_session_id(value) if value else None) or (
                        key.decode("utf-8", "replace") if key else None)
                    if shard_of(route, self.shards) == self.shard:
                        yield self._item(msg)
                else:
                    yield self._item(msg)
                if off + 1 >= r.end:
                    del todo[p]
        finally:
            self.consumer.close()

    def _item(self, msg: Any) -> Item:
        p, off, value = msg.partition(), msg.offset(), msg.value()
        where = f"{self.topic}/{p}@{off}"
        ref = SourceRef(topic=self.topic, partition=p, offset=off)

        key = msg.key()
        try:  # exactly the worker's decoding: the same records are refused for the same reasons
            return Item(where, batch=decode_batch(key, value, self.max_record_bytes), raw=value, ref=ref)
        except Rejected as rej:
            key_text = key.decode("utf-8", "replace") if key else None
            return Item(where, bad=BadInput(where=where, topic=self.topic, partition=p, offset=off,
                                            reason=rej.reason), ref=ref, rejected=rej,
                        remember=key_text == rej.session_id)


# ============================================================================ evaluation


class ReplayError(MonitorError):
    """Replay cannot start or continue (missing topic, unreadable policy, ...)."""

    exit_code = EXIT_USAGE


@dataclass(slots=True)
class Outcome:
    result: BatchResult
    joined: bool
    verdict: Verdict  # as the worker would publish it (a repeat: the stored verdict)
    omitted: tuple = ()  # violations past the verdict's cap: alerts only


class _VerdictSpill:
    """Where a replay's session store keeps verdict records: in SQLite, not memory.

    The worker remembers each session's recent verdicts (to repeat one for a redelivered batch);
    they are read only for an actual duplicate, so a replay keeps them on disk and memory holds
    just what the open sessions need to go on (heads and engine state, in a plain dict).
    """

    def __init__(self, path: str | None = None) -> None:
        self.db = sqlite3.connect(path or ":memory:")
        self.db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
                              "CREATE TABLE IF NOT EXISTS v (k TEXT PRIMARY KEY, j BLOB)")
        self.pending: dict[str, bytes] = {}

    FLUSH = 20_000  # verdicts buffered before a write

    def __setitem__(self, key: str, value: Any) -> None:
        # marshal: a verdict record is plain JSON data, and marshal round-trips it exactly at a
        # fraction of json.dumps' cost (one per batch, rarely read back)
        self.pending[key] = marshal.dumps(value)
        if len(self.pending) >= self.FLUSH:
            self.flush()

    def get(self, key: str, default: Any = None) -> Any:
        raw = self.pending.get(key)
        if raw is None:
            row = self.db.execute("SELECT j FROM v WHERE k=?", (key,)).fetchone()
            raw = row[0] if row else None
        return marshal.loads(raw) if raw is not None else default

    def pop(self, key: str, *default: Any) -> Any:
        # a forgotten verdict is never read again (the head no longer lists its batch): leave it
        return self.pending.pop(key, None)

    def flush(self) -> None:
        self.db.executemany("INSERT OR REPLACE INTO v VALUES (?, ?)", self.pending.items())
        self.pending.clear()

    def close(self) -> None:
        self.db.close()


class Evaluator:
    """The live worker's own evaluator (:class:`monitor.core.BatchEvaluator`) on an in-memory table.

    Everything that decides a verdict - policy selection, repeated batch ids, seq order, the time
    budget, fail-closed, whether a denied batch joins the past - is the worker's code, not a copy.
    """

    def __init__(self, policies: PolicySet, options: ReplayOptions, policy_path: str = "<replay>",
                 spill: str | None = None) -> None:
        from monitor.config import WorkerSettings

        self.policies = policies
        self.options = options
        self.settings = WorkerSettings(
            policy_path=policy_path, engine=options.engine, keep_denied=options.keep_denied,
            verdict_memory=options.verdict_memory, max_record_bytes=max(1024, options.max_record_bytes),
            # no budget unless asked: a verdict must not depend on how busy the machine was
            budget_ms=options.budget_ms,
        )
        self.worker = BatchEvaluator(policies, self.settings)
        self.table: dict[str, Any] = {}
        self.verdicts = _VerdictSpill(spill)
        self.store = SessionStore(self.table, verdict_memory=options.verdict_memory, verdicts=self.verdicts)
        self.lengths: dict[tuple[str, str | None], int] = {}

    def engine_names(self) -> str:
        return ",".join(sorted({e.name for e in self.worker.engines.values()}))

    async def evaluate(self, batch: EventBatch, source: str, ref: SourceRef | None = None) -> Outcome:
        out = await self.worker.evaluate(self.store, batch, ref)
        assert out.verdict is not None
        return self._outcome(out.verdict, out.new, out.omitted, source, batch.seq, len(batch.events))

    async def reject(self, rejected: Rejected, source: str, ref: SourceRef | None = None,
                     remember: bool = True) -> Outcome:
        """The worker's answer to a record it rejects but can address (session and batch ids
        readable): a deny it remembers, or the verdict that batch id already has; with
        ``remember=False`` (a record not keyed by its session id) a deny it only sends."""
        out = await self.worker.reject(self.store, rejected, ref, remember=remember)
        assert out.verdict is not None
        return self._outcome(out.verdict, out.new, out.omitted, source, out.verdict.seq if remember else None, 0)

    def _outcome(self, verdict: Verdict, new: bool, omitted: tuple, source: str, seq: int | None,
                 events: int) -> Outcome:
        joined = new and joins_past(verdict, self.options.keep_denied)
        # the trace index of the batch's first event: what this policy's past of the session holds
        # (counted here rather than re-reading the session head: same number, less work)
        key = (verdict.session_id, verdict.policy_id)
        start = self.lengths.get(key, 0)
        if joined:
            self.lengths[key] = start + events
        # validating is cheaper than model_construct here (pydantic-core vs a Python loop)
        res = BatchResult(
            batch_id=verdict.batch_id, seq=seq, source=source, events=events, start=start,
            decision=verdict.decision, reason=verdict.reason, duplicate=not new, policy_id=verdict.policy_id,
            policy_sha256=verdict.policy_sha256,
            # an audit lists every violation: the verdict's, and those past its cap that the
            # worker sends as alerts only
            violations=verdict.violations + list(omitted) if omitted else verdict.violations, evidence=[])
        return Outcome(res, joined=joined, verdict=verdict, omitted=omitted)

    def close(self) -> None:
        self.worker.close()
        self.verdicts.close()


# ============================================================================ result spool


class ResultStore:
    """Per-batch results on disk (SQLite), so memory does not grow with the number of batches."""

    def __init__(self, directory: str, name: str = "results", *, create: bool = True) -> None:
        self.path = os.path.join(directory, f"{name}.sqlite")
        self.db = sqlite3.connect(self.path)
        self._rows: list[tuple] = []
        self._changes: list[tuple] = []
        if not create:
            return
        self.db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
            "CREATE TABLE batches (session TEXT, ord INTEGER, joined INTEGER, result TEXT, raw BLOB);"
            "CREATE TABLE changes (session TEXT, ord INTEGER, data TEXT);"
        )

    @classmethod
    def open(cls, path: str) -> "ResultStore":
        """A finished spool, for reading."""
        return cls(os.path.dirname(path), Path(path).stem, create=False)

    def add(self, session: str, ord_: int, joined: bool, result: BatchResult, raw: bytes) -> None:
        # the result as the report writes it: the report is put together from these texts
        self._rows.append((session, ord_, int(joined), result.model_dump_json(by_alias=True), raw))
        if len(self._rows) >= 5000:
            self.flush()

    def add_change(self, session: str, ord_: int, change: BatchChange) -> None:
        self._changes.append((session, ord_, change.model_dump_json()))

    def flush(self) -> None:
        if self._rows:
            self.db.executemany("INSERT INTO batches VALUES (?,?,?,?,?)", self._rows)
            self._rows.clear()
        if self._changes:
            self.db.executemany("INSERT INTO changes VALUES (?,?,?)", self._changes)
            self._changes.clear()

    def finish(self) -> None:
        self.flush()
        self.db.execute("CREATE INDEX batches_by_session ON batches (session, ord)")
        self.db.execute("CREATE INDEX changes_by_session ON changes (session, ord)")
        self.db.commit()

    def session_rows(self, with_raw: bool) -> Iterator[tuple[str, list[tuple]]]:
        """(session, rows) in session order; rows are (ord, joined, result[, raw])."""
        cols = "session, ord, joined, result" + (", raw" if with_raw else "")
        cur = self.db.execute(f"SELECT {cols} FROM batches ORDER BY session, ord")
        current, rows = None, []
        for row in cur:
            if row[0] != current:
                if current is not None:
                    yield current, rows
                current, rows = row[0], []
            rows.append(row[1:])
        if current is not None:
            yield current, rows

    def raw_rows(self, session: str) -> list[tuple]:
        return self.db.execute("SELECT ord, joined, result, raw FROM batches WHERE session=? ORDER BY ord",
                               (session,)).fetchall()

    def changes(self) -> Iterator[tuple[str, list[BatchChange]]]:
        cur = self.db.execute("SELECT session, data FROM changes ORDER BY session, ord")
        current, items = None, []
        for sid, data in cur:
            if sid != current:
                if current is not None:
                    yield current, items
                current, items = sid, []
            items.append(BatchChange.model_validate_json(data))
        if current is not None:
            yield current, items

    def close(self) -> None:
        self.db.close()


# ============================================================================ evidence


def _walk(value: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(value, str):
            try:
                value = json.loads(value)  # tool-call arguments may be a JSON string
            except ValueError:
                return None
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def evidence_for(address: str, past: list[dict[str, Any]], pending: list[dict[str, Any]],
                 start: int) -> Evidence | None:
    """The text behind ``messages.N.field:a-b`` in a session whose past is ``past``.

    >>> evidence_for("messages.0.content:7-11", [], [{"role": "user", "content": "please send"}], 0).text
    'please send'
    """
    body, _, span = address.partition(":")
    parts = body.split(".")
    if len(parts) < 2 or parts[0] != "messages" or not parts[1].isdigit():
        return None
    n = int(parts[1])
    if n < start:
        event = past[n] if n < len(past) else None
    else:
        event = pending[n - start] if n - start < len(pending) else None
    if not isinstance(event, dict):
        return None
    value = _walk(event, parts[2:])
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
    s = e = None
    if span and "-" in span:
        a, _, b = span.partition("-")
        if a.isdigit() and b.isdigit():
            s, e = int(a), int(b)
    limit = max(TEXT_LIMIT, (e or 0) + 200)
    return Evidence(address=address, event=n, role=event.get("role") or ("tool_call" if "function" in event else None),
                    field=".".join(parts[2:]), text=text[:limit], start=s, end=e, truncated=len(text) > limit)


def _trace_of(raw: bytes | None) -> list[dict[str, Any]]:
    if not raw:
        return []
    if raw[:1] == b"[":
        return json.loads(raw)
    # as it was decoded when it was evaluated (a BOM, say, passes there)
    return decode_batch(None, raw, len(raw), keyed=False).trace()


# ============================================================================ orchestration


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
                             budget_ms=self.budget_ms, max_record_bytes=self.max_record_bytes)


@dataclass
class ReplayResult:
    report: Report  # without sessions (they are in the file)
    out: str
    html: str | None
    seconds: float
    changed_sessions: list[SessionChange] = field(default_factory=list)
    shards: int = 1
    peak_rss_mib: float = 0.0  # this process plus every shard process (an upper bound: pages are shared)

    @property
    def events_per_s(self) -> float:
        return self.report.totals.events / self.seconds if self.seconds > 0 else 0.0


def _policy_ref(path: str, ps: PolicySet) -> PolicyRef:
    files = []
    for f in policy_files(path):
        data = f.read_bytes()
        files.append(InputFile(path=str(f), sha256=hashlib.sha256(data).hexdigest(), bytes=len(data)))
    return PolicyRef(path=path, policy_id=ps.default.policy_id, sha256=ps.default.sha256, files=files)


class _Publisher:
    """Verdicts and alerts of a replay to ``<prefix>.verdicts`` / ``<prefix>.alerts``."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        from confluent_kafka import Producer

        from monitor.config import TopicNames

        self.topics = TopicNames.for_prefix(prefix)
        try:  # a cluster may not auto-create topics; provisioning is idempotent
            from monitor.topics import create_topics

            create_topics(bootstrap, prefix)
        except Exception as exc:  # noqa: BLE001 - producing will say what is wrong, if anything
            print(f"replay: could not provision topics under {prefix!r}: {exc}", file=sys.stderr)
        self.producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                                  "partitioner": "murmur2_random"})

    def send(self, verdict: Verdict, omitted: tuple = ()) -> None:
        """What the worker publishes for a batch: its verdict (a repeat: the stored one) and an
        alert per violation, those past the verdict's cap included."""
        key = verdict.session_id.encode()
        self._produce(self.topics.verdicts, key, verdict.model_dump_json().encode())
        for viol in [*verdict.violations, *omitted]:
            self._produce(self.topics.alerts, key, Alert.from_violation(viol, verdict).model_dump_json().encode())

    def _produce(self, topic: str, key: bytes, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                self.producer.poll(0.1)
        self.producer.poll(0)

    def close(self) -> None:
        left = self.producer.flush(30)
        if left:
            raise ReplayError(f"{left} verdicts/alerts could not be published")


class _Progress:
    """A rich progress bar with events/s; silent when disabled."""

    def __init__(self, enabled: bool, total: int, unit: str) -> None:
        self.enabled = enabled
        self.last = 0.0
        self.t0 = time.monotonic()
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("[bold]replay"), BarColumn(), TextColumn("{task.percentage:>3.0f}% of " + unit),
                TextColumn("{task.fields[events]:,} events · {task.fields[rate]:,.0f} events/s"),
                TimeElapsedColumn(), transient=False,
            )
            self.task = self.bar.add_task("replay", total=total or None, events=0, rate=0.0)
            self.bar.start()

    def update(self, done: int, events: int, force: bool = False, total: int | None = None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if force or now - self.last > 0.2:
            self.last = now
            rate = events / (now - self.t0) if now > self.t0 else 0.0
            self.bar.update(self.task, completed=done, events=events, rate=rate,
                            **({"total": total} if total else {}))

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()


@dataclass
class _SessionAgg:
    ord: int = 0
    events: int = 0
    denied: int = 0
    violations: int = 0
    other_denied: int = 0


@dataclass
class _ShardSummary:
    """What one shard of a replay found, besides its per-batch spool."""

    db: str
    sessions: dict[str, _SessionAgg] = field(default_factory=dict)
    rules: dict[tuple[str | None, int, str], list[Any]] = field(default_factory=dict)
    bad: list[BadInput] = field(default_factory=list)
    counts: Counts = field(default_factory=Counts)
    decisions: dict[str, int] = field(default_factory=lambda: {"allow": 0, "deny": 0})
    other_decisions: dict[str, int] = field(default_factory=lambda: {"allow": 0, "deny": 0})
    batches_changed: int = 0
    files: list[InputFile] = field(default_factory=list)
    kafka: KafkaInput | None = None
    engine: str = ""
    peak_rss_mib: float = 0.0  # of the shard's process, when it has its own


def shard_of(session_id: str | None, shards: int) -> int:
    """Which shard evaluates a session: stable across processes and runs (crc32, not hash())."""
    if shards <= 1 or not session_id:
        return 0
    # surrogatepass: an id json read with a lone surrogate still has a shard (its record is refused there)
    return zlib.crc32(session_id.encode("utf-8", "surrogatepass")) % shards


def _kafka_source(req: ReplayRequest, shard: tuple[int, int] = (0, 1)) -> KafkaSource:
    if not req.bootstrap_servers:
        raise ReplayError("a topic replay needs --bootstrap-servers (or KAFKA_BOOTSTRAP_SERVERS)")
    if req.publish_prefix and req.topic and req.topic.startswith(req.publish_prefix + "."):
        raise ReplayError(f"--publish {req.publish_prefix!r} is the prefix of the topic being replayed: "
                          "replay never writes to the topics it reads")
    return KafkaSource(req.bootstrap_servers, req.topic or "", from_time=req.from_time, to_time=req.to_time,
                       from_offsets=req.from_offsets, to_offsets=req.to_offsets, partitions=req.partitions,
                       max_record_bytes=req.max_record_bytes, shard=shard)


async def _evaluate_shard(req: ReplayRequest, shard: int, shards: int, db_dir: str,
                          report: Any = None, policies: PolicySet | None = None,
                          other: PolicySet | None = None) -> _ShardSummary:
    """Read the input, evaluate the sessions of this shard, spool per-batch results to SQLite.

    ``report(done, events[, total])`` is called now and then with progress (bytes or records read).
    """
    options = req.options()
    policies = policies or load_policy_set(req.policy)
    if req.compare and other is None:
        other = load_policy_set(req.compare)
    source: FileSource | KafkaSource
    if req.topic:
        source = _kafka_source(req, (shard, shards))
    else:
        source = FileSource(req.inputs, trace_batch=req.trace_batch, max_record_bytes=req.max_record_bytes,
                            shard=(shard, shards))
    if report is not None and isinstance(source, KafkaSource):
        report(0, 0, source.total)  # the records to read are known once the range is planned
    main = Evaluator(policies, options, req.policy, os.path.join(db_dir, f"verdicts-{shard}.sqlite"))
    alt = Evaluator(other, options, req.compare or "", os.path.join(db_dir, f"verdicts-{shard}-b.sqlite")) \
        if other else None
    publisher = None
    if req.publish_prefix:
        bootstrap = req.publish_bootstrap or req.bootstrap_servers
        if not bootstrap:
            raise ReplayError("--publish needs --bootstrap-servers")
        publisher = _Publisher(bootstrap, req.publish_prefix)
    store = ResultStore(db_dir, f"shard-{shard}")
    out_summary = _ShardSummary(db=store.path)
    sessions, rules, bad, counts = out_summary.sessions, out_summary.rules, out_summary.bad, out_summary.counts
    decisions, other_decisions = out_summary.decisions, out_summary.other_decisions
    last = 0.0
    # plain ints in the loop: a pydantic model's attribute write costs a Python call per batch
    records = batches = events = duplicates = 0
    try:
        for item in source:
            batch = item.batch
            rej = item.rejected
            sid = batch.session_id if batch is not None else (rej.session_id if rej is not None else None)
            records += 1
            if item.bad is not None:
                bad.append(item.bad)
            if batch is None and not (rej is not None and rej.session_id and rej.batch_id):
                continue
            assert sid is not None
            agg = sessions.get(sid)
            if agg is None:
                agg = sessions[sid] = _SessionAgg()
            if batch is None:  # the worker denies a rejected record it can address
                out = await main.reject(rej, item.where, item.ref, item.remember)
                raw = b""
            else:
                out = await main.evaluate(batch, item.where, item.ref)
                raw = item.raw if item.raw is not None else json.dumps(batch.trace()).encode()
            res = out.result
            store.add(sid, agg.ord, out.joined, res, raw)
            batches += 1
            events += res.events
            agg.events += res.events
            decisions[res.decision] += 1
            if res.duplicate:
                duplicates += 1
            if res.decision == "deny":
                agg.denied += 1
            if not res.duplicate and res.violations:
                agg.violations += len(res.violations)
                seen_rules = set()
                for v in res.violations:
                    k = (res.policy_id, v.rule_index, v.message)
                    r = rules.get(k)
                    if r is None:
                        r = rules[k] = [v.severity, 0, 0, set()]
                    r[1] += 1
                    if k not in seen_rules:
                        r[2] += 1
                        seen_rules.add(k)
                    r[3].add(sid)
            if alt is not None:
                o = (await (alt.evaluate(batch, item.where, item.ref) if batch is not None
                            else alt.reject(rej, item.where, item.ref, item.remember))).result
                other_decisions[o.decision] += 1
                if o.decision == "deny":
                    agg.other_denied += 1
                if o.decision != res.decision:
                    out_summary.batches_changed += 1
                    store.add_change(sid, agg.ord, BatchChange(
                        batch_id=res.batch_id, source=item.where, decision=res.decision,
                        other_decision=o.decision, violations=[violation_line(v) for v in res.violations],
                        other_violations=[violation_line(v) for v in o.violations],
                        reason=res.reason, other_reason=o.reason))
            if publisher is not None:
                publisher.send(out.verdict, out.omitted)
            agg.ord += 1
            if report is not None and batches % 256 == 0:
                now = time.monotonic()
                if now - last > 0.1:
                    last = now
                    report(source.done, events)
        if report is not None:
            report(source.done, events)
    finally:
        counts.records, counts.batches, counts.events, counts.duplicates = records, batches, events, duplicates
        main.close()
        if alt:
            alt.close()
    if publisher is not None:
        publisher.close()
    store.finish()
    store.close()
    if isinstance(source, FileSource):
        out_summary.files = source.read
    else:
        out_summary.kafka = source.describe()
    out_summary.engine = main.engine_names()
    return out_summary


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """Less cyclic garbage collection while a shard evaluates.

    Evaluation allocates many short-lived objects (pydantic models, dicts), so the collector runs
    often, and every full pass walks the policy, the imports and all open sessions. Freezing what
    exists (nothing of it is garbage) and collecting the young generation less often keeps the
    same memory bound: cycles are still collected, just in bigger steps.
    """
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, before[1], before[2])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def _shard_child(req: ReplayRequest, shard: int, shards: int, db_dir: str, progress: Any,
                 policies: PolicySet, other: PolicySet | None) -> None:
    """Entry of a shard process (forked): the summary (or the error) goes to a pickle file."""
    path = os.path.join(db_dir, f"shard-{shard}.pickle")

    def report(done: int, events: int, total: int | None = None) -> None:
        progress[2 * shard], progress[2 * shard + 1] = done, events

    try:
        with _fewer_collections():
            summary: Any = asyncio.run(_evaluate_shard(req, shard, shards, db_dir, report, policies,
                                                       other))
        summary.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except BaseException as exc:  # noqa: BLE001 - the parent re-raises it with its message
        summary = ReplayError(f"shard {shard}: {type(exc).__name__}: {exc}")
    with open(path, "wb") as fh:
        pickle.dump(summary, fh)


def _auto_shards(req: ReplayRequest) -> int:
    if req.shards:
        return max(1, req.shards)
    if req.topic:
        return 1
    # below ~16 MiB the start of a second process costs more than it saves
    size = sum(f.stat().st_size for f in discover_files(req.inputs) if f.is_file())
    return 1 if size < 16 * 2**20 else max(1, min(4, os.cpu_count() or 1))


def _run_shards(req: ReplayRequest, shards: int, workdir: str, policies: PolicySet,
                other: PolicySet | None) -> list[_ShardSummary]:
    if req.topic and shards > 1:
        # one plan for every shard: the same ranges, which each shard reads whole and keeps its
        # sessions of (by partition would split a session whose records came under other keys)
        plan = _kafka_source(req)
        plan.consumer.close()
        ranges = [r for r in plan.ranges]
    total = FileSource(req.inputs).total if not req.topic else 0
    if req.topic and shards > 1:
        total = sum(r.end - r.start for r in ranges)
    if shards == 1:
        progress = _Progress(req.progress, total, "records" if req.topic else "bytes")
        try:
            with _fewer_collections():
                return [asyncio.run(_evaluate_shard(req, 0, 1, workdir,
                                                    lambda d, e, t=None: progress.update(d, e, True, t),
                                                    policies, other))]
        finally:
            progress.close()
    ctx = mp.get_context("fork")  # the parsed policy and imports are shared, nothing is re-imported
    shared = ctx.Array("q", 2 * shards, lock=False)
    procs = []
    for k in range(shards):
        sub = req
        if req.topic:
            sub = replace(req, partitions=[r.partition for r in ranges],
                          from_offsets={r.partition: r.start for r in ranges},
                          to_offsets={r.partition: r.end for r in ranges}, from_time=None, to_time=None)
        p = ctx.Process(target=_shard_child, args=(sub, k, shards, workdir, shared, policies, other),
                        daemon=True)
        p.start()
        procs.append(p)
    progress = _Progress(req.progress, total * shards, "records" if req.topic else "bytes")
    try:
        while any(p.is_alive() for p in procs):
            progress.update(sum(shared[0::2]), sum(shared[1::2]), force=True)
            time.sleep(0.2)
        progress.update(sum(shared[0::2]), sum(shared[1::2]), force=True)
    finally:
        progress.close()
        for p in procs:
            p.join()
    summaries = []
    for k, p in enumerate(procs):
        path = os.path.join(workdir, f"shard-{k}.pickle")
        if not os.path.exists(path):
            raise ReplayError(f"shard {k} died (exit code {p.exitcode}) without a result")
        with open(path, "rb") as fh:
            summary = pickle.load(fh)
        if isinstance(summary, BaseException):
            raise summary
        summaries.append(summary)
    return summaries


def _replay(req: ReplayRequest, workdir: str) -> ReplayResult:
    t0 = time.monotonic()
    if not req.topic and not req.inputs:
        raise ReplayError("nothing to replay: give trace files or folders, or --topic/--prefix")
    if not req.topic and not discover_files(req.inputs):
        raise ReplayError(f"no trace files ({', '.join(TRACE_SUFFIXES + JSONL_SUFFIXES)}) in "
                          + ", ".join(req.inputs))
    options = req.options()
    policies = load_policy_set(req.policy)  # refuse a bad policy before any work starts
    other = load_policy_set(req.compare) if req.compare else None
    for target in (req.out, req.html):  # and an unwritable report path before the work, not after
        if target:
            _check_writable(target)
    summaries = _run_shards(req, _auto_shards(req), workdir, policies, other)

    sessions: dict[str, _SessionAgg] = {}
    rules: dict[tuple[str | None, int, str], list[Any]] = {}
    bad: list[BadInput] = []
    counts = Counts()
    decisions = {"allow": 0, "deny": 0}
    other_decisions = {"allow": 0, "deny": 0}
    for s in summaries:  # shards hold disjoint sessions: sums and unions
        sessions.update(s.sessions)
        bad.extend(s.bad)
        for name in ("records", "batches", "duplicates", "events"):
            setattr(counts, name, getattr(counts, name) + getattr(s.counts, name))
        for d in ("allow", "deny"):
            decisions[d] += s.decisions[d]
            other_decisions[d] += s.other_decisions[d]
        for k, v in s.rules.items():
            r = rules.setdefault(k, [v[0], 0, 0, set()])
            r[1] += v[1]
            r[2] += v[2]
            r[3] |= v[3]
    first = summaries[0]
    counts.sessions = len(sessions)
    counts.bad_input = len(bad)
    bad.sort(key=lambda b: (b.file or b.topic or "", b.partition or 0, b.line or 0, b.offset or 0, b.where))
    totals = Totals(
        sessions=len(sessions), sessions_denied=sum(1 for a in sessions.values() if a.denied),
        batches=counts.batches, events=counts.events, decisions=decisions, bad_input=len(bad),
        rules=[RuleTotal(policy_id=k[0], rule_index=k[1], message=k[2], severity=v[0], violations=v[1],
                         batches=v[2], sessions=len(v[3]))
               for k, v in sorted(rules.items(), key=lambda kv: (kv[0][0] or "", kv[0][1], kv[0][2]))],
    )
    kafka = first.kafka.model_copy(update={"from_time": req.from_time, "to_time": req.to_time}) \
        if first.kafka is not None else None
    inputs = Inputs(kafka=kafka) if req.topic else Inputs(roots=list(req.inputs), files=first.files)
    manifest = Manifest(
        created_at=req.created_at or now_iso(), command=list(req.command), versions=versions(),
        engine=first.engine, policy=_policy_ref(req.policy, policies),
        compare_policy=_policy_ref(req.compare, other) if req.compare and other else None,
        options=options, inputs=inputs, counts=counts,
    )
    stores = [ResultStore.open(s.db) for s in summaries]
    where = {}
    for k, s in enumerate(summaries):
        for sid in s.sessions:
            where[sid] = k
    compare = None
    changes: list[SessionChange] = []
    if other is not None and req.compare:
        for sid, items in heapq.merge(*(st.changes() for st in stores), key=lambda x: x[0]):
            a = sessions[sid]
            changes.append(SessionChange(session_id=sid, decision="deny" if a.denied else "allow",
                                         other_decision="deny" if a.other_denied else "allow", batches=items))
        compare = CompareResult(
            policy=manifest.compare_policy, decisions=other_decisions,  # type: ignore[arg-type]
            sessions_denied=sum(1 for a in sessions.values() if a.other_denied),
            sessions_changed=sum(1 for c in changes if c.verdict_changed),
            batches_changed=sum(s.batches_changed for s in summaries), changes=changes)
    head = Report(manifest=manifest, totals=totals, bad_input=bad, compare=compare)

    def session_results() -> Iterator[SessionResult]:
        merged = heapq.merge(*(st.session_rows(with_raw=False) for st in stores), key=lambda x: x[0])
        for sid, rows in merged:
            a = sessions[sid]
            if a.denied:
                batches = _with_evidence(stores[where[sid]].raw_rows(sid))
                yield SessionResult(session_id=sid, decision="deny", batches_total=len(batches),
                                    events=a.events, denied=a.denied, violations=a.violations,
                                    batches=batches)
            else:  # the spooled texts as they are: no parsing and dumping again
                yield session_text(SessionResult(
                    session_id=sid, decision="allow", batches_total=len(rows), events=a.events,
                    denied=a.denied, violations=a.violations), [r[2] for r in rows])

    _write_atomically(req.out, lambda fh: write_report(fh, head, session_results()))
    for st in stores:
        st.close()
    html_path = None
    if req.html:
        _write_atomically(req.html, lambda fh: fh.write(render_html(Report.load(req.out))))
        html_path = req.html
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return ReplayResult(report=head, out=req.out, html=html_path, seconds=time.monotonic() - t0,
                        changed_sessions=changes, shards=len(summaries),
                        peak_rss_mib=own + sum(s.peak_rss_mib for s in summaries))


def _write_atomically(path: str, write: Callable[[IO[str]], Any]) -> None:
    """``write`` to a temporary file beside ``path``, then put it in place: a reader never sees
    half a report, and a failure leaves no temporary file behind."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check_writable(path: str) -> None:
    if Path(path).is_dir():
        raise ReplayError(f"cannot write {path}: it is a directory")
    probe = Path(path + ".tmp")
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ReplayError(f"cannot write {path}: {exc.strerror or exc}") from None


def _with_evidence(rows: list[tuple]) -> list[BatchResult]:
    """Results of a denied session with the text of every address, read back from the spool."""
    past: dict[str | None, list[dict[str, Any]]] = {}
    out = []
    for _ord, joined, result, raw in rows:
        res = BatchResult.model_validate_json(result)
        pending = _trace_of(raw)
        trace = past.setdefault(res.policy_id, [])
        if res.violations and not res.duplicate:
            ev = []
            for v in res.violations:
                for addr in v.addresses:
                    e = evidence_for(addr, trace, pending, res.start)
                    if e is not None and e not in ev:
                        ev.append(e)
            res.evidence = ev
        if joined:
            trace.extend(pending)
        out.append(res)
    return out


def run_replay(req: ReplayRequest) -> ReplayResult:
    """Replay ``req`` and write its JSON (and HTML) report; see the module docstring."""
    os.environ.setdefault("LOCAL_POLICY", "1")
    with tempfile.TemporaryDirectory(prefix="agent-monitor-replay-", dir=req.workdir) as workdir:
        return _replay(req, workdir)


# ============================================================================ verify


@dataclass
class VerifyResult:
    ok: bool
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verdicts_checked: int = 0


def _file_problems(files: list[InputFile], what: str) -> list[str]:
    out = []
    for f in files:
        p = Path(f.path)
        if not p.is_file():
            out.append(f"{what} {f.path} is missing")
            continue
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if digest != f.sha256:
            out.append(f"{what} {f.path} changed: sha256 {digest} != {f.sha256} in the report")
    return out


def _differing(a: Any, b: Any, exclude: frozenset[str] = frozenset()) -> list[str]:
    """The fields in which two results of one model differ."""
    return [name for name in type(a).model_fields if name not in exclude and getattr(a, name) != getattr(b, name)]


def _batch_line(b: BatchResult | None) -> str:
    if b is None:
        return "nothing"
    return f"{b.decision} with {len(b.violations)} violations" + (f" ({b.reason})" if b.reason else "")


def _result_problems(report: Report, again: Report) -> tuple[list[str], int]:
    """Where a re-run's results differ from a report's: every field of every batch result (the
    verdict, its reason and violations, evidence ...), of every session, and the totals."""
    problems: list[str] = []
    theirs = {(s.session_id, i): b for s in report.sessions for i, b in enumerate(s.batches)}
    ours = {(s.session_id, i): b for s in again.sessions for i, b in enumerate(s.batches)}
    diffs = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    for k in diffs[:20]:
        a, b = theirs.get(k), ours.get(k)
        fields = f" ({', '.join(_differing(a, b))} differ)" if a is not None and b is not None else ""
        problems.append(f"session {k[0]} batch #{k[1]}{fields}: report has {_batch_line(a)}, "
                        f"re-run gives {_batch_line(b)}")
    if len(diffs) > 20:
        problems.append(f"... and {len(diffs) - 20} more differing verdicts")
    sessions = {s.session_id: s for s in again.sessions}
    for s in report.sessions:
        mine = sessions.get(s.session_id)
        if mine is not None and (fields := _differing(s, mine, frozenset({"batches"}))):
            problems.append(f"session {s.session_id}: {', '.join(fields)} differ")
    if fields := _differing(report.totals, again.totals):
        problems.append(f"the totals differ: {', '.join(fields)}")
    return problems, len(theirs)


def verify_report(path: str | Path, *, bootstrap_servers: str | None = None, workdir: str | None = None,
                  progress: bool = False) -> VerifyResult:
    """Re-run a report from its manifest; ok iff inputs, policy and every verdict are identical."""
    report = Report.load(path)
    m = report.manifest
    problems: list[str] = []
    notes: list[str] = []
    if m.policy is None or m.policy.path is None:
        return VerifyResult(False, ["the report's manifest names no policy"])
    problems += _file_problems(m.inputs.files, "input file")
    problems += _file_problems(m.policy.files, "policy file")
    if m.compare_policy is not None:
        problems += _file_problems(m.compare_policy.files, "compare policy file")
    if problems:
        return VerifyResult(False, problems)
    with tempfile.TemporaryDirectory(prefix="agent-monitor-verify-", dir=workdir) as tmp:
        o = m.options
        req = ReplayRequest(
            policy=m.policy.path, compare=m.compare_policy.path if m.compare_policy else None,
            out=os.path.join(tmp, "report.json"), engine=o.engine, keep_denied=o.keep_denied,
            verdict_memory=o.verdict_memory, trace_batch=o.trace_batch, budget_ms=o.budget_ms,
            max_record_bytes=o.max_record_bytes, progress=progress, command=m.command, workdir=tmp)
        if m.inputs.kafka is not None:
            k = m.inputs.kafka
            req.topic = k.topic
            req.bootstrap_servers = bootstrap_servers or k.bootstrap_servers
            req.partitions = [r.partition for r in k.partitions]
            req.from_offsets = {r.partition: r.start for r in k.partitions}
            req.to_offsets = {r.partition: r.end for r in k.partitions}
        else:
            # the paths as given: a plain trace is named after its path inside the given folder
            req.inputs = list(m.inputs.roots) or [f.path for f in m.inputs.files]
        try:
            run_replay(req)
        except Exception as exc:  # noqa: BLE001 - any failure to re-run is a failed verification
            return VerifyResult(False, [f"the replay could not be re-run: {type(exc).__name__}: {exc}"])
        again = Report.load(req.out)
    if again.manifest.engine != m.engine:
        notes.append(f"engine now {again.manifest.engine!r}, report made with {m.engine!r}")
    if m.inputs.kafka is not None and again.manifest.inputs.kafka is not None:
        if len(m.inputs.kafka.partitions) != len(again.manifest.inputs.kafka.partitions):
            problems.append("the re-run read a different set of partitions")
        for a, b in zip(m.inputs.kafka.partitions, again.manifest.inputs.kafka.partitions, strict=False):
            if a.records != b.records:
                problems.append(f"partition {a.partition}: {b.records} records read now, {a.records} in the report")
    elif [f.path for f in again.manifest.inputs.files] != [f.path for f in m.inputs.files]:
        problems.append("the re-run read a different set of files")
    for name in ("records", "batches", "events", "sessions", "bad_input"):
        x, y = getattr(m.counts, name), getattr(again.manifest.counts, name)
        if x != y:
            problems.append(f"{name}: {y} now, {x} in the report")
    if [(b.where, b.reason) for b in again.bad_input] != [(b.where, b.reason) for b in report.bad_input]:
        problems.append("the bad input listed differs")
    # a policy folder is what it holds now: a file added to it changes the policy
    for what, mine, now in (("policy", m.policy, again.manifest.policy),
                            ("compare policy", m.compare_policy, again.manifest.compare_policy)):
        if mine is None or now is None:
            continue
        if [f.path for f in now.files] != [f.path for f in mine.files]:
            added = sorted({f.path for f in now.files} - {f.path for f in mine.files})
            gone = sorted({f.path for f in mine.files} - {f.path for f in now.files})
            problems.append(f"the {what} {mine.path} holds other files now"
                            + (f"; added: {', '.join(added)}" if added else "")
                            + (f"; gone: {', '.join(gone)}" if gone else ""))
        elif now.sha256 != mine.sha256:
            problems.append(f"the {what} {mine.path} changed: sha256 {now.sha256} != {mine.sha256} in the report")
    found, checked = _result_problems(report, again)
    problems += found
    if report.compare is not None and again.compare is not None:
        if report.compare.model_dump(exclude={"policy"}) != again.compare.model_dump(exclude={"policy"}):
            problems.append("the comparison with the second policy differs")
    return VerifyResult(not problems, problems, notes, verdicts_checked=checked)


# ============================================================================ CLI


def _print_summary(res: ReplayResult, console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    r = res.report
    t = r.totals
    table = Table(title="replay summary")
    table.add_column("what")
    table.add_column("count", justify="right")
    for name, value in [("sessions", t.sessions), ("sessions denied", t.sessions_denied),
                        ("batches", t.batches), ("events", t.events),
                        ("allowed batches", t.decisions.get("allow", 0)),
                        ("denied batches", t.decisions.get("deny", 0)),
                        ("duplicate batches", r.manifest.counts.duplicates), ("bad input", t.bad_input),
                        ("events/s", f"{res.events_per_s:,.0f}")]:
        table.add_row(name, f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)
    if t.rules:
        rt = Table(title="violations by rule")
        for col in ("policy", "rule", "message", "severity", "violations", "sessions"):
            rt.add_column(col)
        for rule in t.rules:
            # rule messages and ids are data: "[risk=medium]" is no markup tag
            rt.add_row(escape(rule.policy_id or ""), str(rule.rule_index), escape(rule.message), rule.severity,
                       str(rule.violations), str(rule.sessions))
        console.print(rt)
    if r.compare is not None:
        c = r.compare
        ct = Table(title=f"compared with {escape(c.policy.policy_id)}: {c.sessions_changed} sessions change verdict")
        for col in ("session", "this policy", "other policy", "why"):
            ct.add_column(col)
        for ch in c.changes[:50]:
            why = "; ".join((b.violations or [b.reason or ""])[0] + " → " +
                            ((b.other_violations or [b.other_reason or "allowed"])[0])
                            for b in ch.batches[:3])
            ct.add_row(escape(ch.session_id), ch.decision, ch.other_decision, escape(why))
        console.print(ct)
    if r.bad_input:
        console.print(f"[yellow]{len(r.bad_input)} bad input records were skipped "
                      f"(first: {escape(r.bad_input[0].where)}: {escape(r.bad_input[0].reason)})")
    console.print(escape(f"report: {res.out}" + (f"  html: {res.html}" if res.html else "")))


def _console() -> Any:
    from rich.console import Console

    # wide enough that rule messages and paths are not wrapped in CI logs
    return Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def _cmd_replay(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from monitor.config import TopicNames, env_bootstrap

    console = _console()
    topic = args.topic or (TopicNames.for_prefix(args.prefix).events if args.prefix else None)
    if topic and args.inputs:
        console.print("[red]give either trace files or --topic/--prefix, not both")
        return 2
    req = ReplayRequest(
        policy=args.policy, inputs=args.inputs, out=args.out, html=args.html, compare=args.compare,
        engine=args.engine, keep_denied=args.keep_denied, verdict_memory=args.verdict_memory,
        trace_batch=args.trace_batch, budget_ms=args.budget_ms, max_record_bytes=args.max_record_bytes,
        bootstrap_servers=args.bootstrap_servers or (env_bootstrap() if topic or args.publish else None),
        topic=topic, from_time=args.from_time, to_time=args.to_time,
        from_offsets=args.from_offset, to_offsets=args.to_offset, partitions=args.partitions,
        publish_prefix=args.publish, shards=args.shards, progress=not args.no_progress and sys.stderr.isatty() or args.progress,
        command=["agent-monitor", *(getattr(args, "argv_", None) or sys.argv[1:])],
    )
    try:
        res = run_replay(req)
    except (ReplayError, ValueError, OSError) as exc:
        console.print(f"[red]replay failed: {escape(str(exc))}")
        return 2
    _print_summary(res, console)
    if args.fail_on_deny and res.report.totals.decisions.get("deny", 0):
        return 1
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from rich.markup import escape

    console = _console()
    try:
        res = verify_report(args.report, bootstrap_servers=args.bootstrap_servers)
    except (OSError, ValidationError) as exc:
        console.print(f"[red]cannot read the report {escape(args.report)}: {escape(str(exc))}")
        return 2
    for note in res.notes:
        console.print(f"[yellow]note: {escape(note)}")
    if res.ok:
        print(f"OK: {args.report}: inputs, policy and all {res.verdicts_checked} verdicts and their "
              "violations are identical")
        return 0
    print(f"FAILED: {args.report}")
    for p in res.problems:
        print(f"  - {p}")
    return 1


def _time_arg(value: str) -> str:
    try:
        _parse_time(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO time (2026-11-21T00:00:00Z) or milliseconds since the epoch, got {value!r}") from None
    return value


def _offsets_arg(value: str) -> int | dict[int, int]:
    try:
        offsets = parse_offsets(value)
    except ValueError:
        offsets = None
    pairs = [(0, offsets)] if isinstance(offsets, int) else list((offsets or {}).items())
    given = value.count(",") + 1 if isinstance(offsets, dict) else 1
    if offsets is None or any(p < 0 or o < 0 for p, o in pairs) or len(pairs) != given:
        raise argparse.ArgumentTypeError(
            f"expected an offset N for every partition or P:N,P:N per partition (each partition once), "
            f"got {value!r}")
    return offsets


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = low - 1
        if n < low:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {low}, got {value!r}")
        return n
    return parse


def _partitions_arg(value: str) -> list[int]:
    try:
        parts = [int(p) for p in value.split(",")]
    except ValueError:
        parts = []
    if not parts or any(p < 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected partition numbers like 0,3, got {value!r}")
    return parts


def register_cli(subparsers: Any) -> None:
    """Add ``replay`` and ``verify`` to an argparse subparsers object; handlers are ``args.func``."""
    p = subparsers.add_parser(
        "replay", help="run a policy over recorded sessions (files or a topic) and write an audit report",
        description="Replay trace files/folders or a topic's time/offset range through a policy.")
    p.add_argument("inputs", nargs="*", help="trace files or folders (.json, .jsonl)")
    p.add_argument("--policy", required=True, help="policy file or folder (e.g. the one the worker runs)")
    p.add_argument("--compare", metavar="OTHER_POLICY", help="also run this policy and show what changes")
    p.add_argument("--engine", choices=["incremental", "reference"], default="incremental")
    p.add_argument("--out", "-o", default="replay-report.json", help="JSON report path")
    p.add_argument("--html", help="also write an HTML report here")
    p.add_argument("--bootstrap-servers", help="Kafka cluster (default $KAFKA_BOOTSTRAP_SERVERS)")
    p.add_argument("--topic", help="replay this events topic")
    p.add_argument("--prefix", help="replay <prefix>.events")
    p.add_argument("--from-time", type=_time_arg, help="ISO time or epoch ms: first record to read")
    p.add_argument("--to-time", type=_time_arg, help="ISO time or epoch ms: stop before records from this time")
    p.add_argument("--from-offset", type=_offsets_arg, help="N or P:N,P:N (inclusive)")
    p.add_argument("--to-offset", type=_offsets_arg, help="N or P:N,P:N (exclusive)")
    p.add_argument("--partitions", type=_partitions_arg, help="only these partitions, e.g. 0,3")
    p.add_argument("--publish", metavar="PREFIX", help="send verdicts and alerts to PREFIX.verdicts/.alerts")
    p.add_argument("--keep-denied", action="store_true", help="denied batches join the session's past")
    p.add_argument("--verdict-memory", type=int, default=64, help="recent batch ids remembered per session")
    p.add_argument("--trace-batch", type=int, default=1, help="events per batch for plain traces")
    p.add_argument("--budget-ms", type=float, help="time budget per batch (default: none, for reproducibility)")
    p.add_argument("--max-record-bytes", type=_int_at_least(1024), default=1_000_000,
                   help="records over this size are refused, as the worker refuses them (at least 1024)")
    p.add_argument("--shards", type=_int_at_least(1), help="processes evaluating disjoint sessions "
                   "(default: 1, or up to 4 by cores for inputs over 16 MiB; a topic: 1)")
    p.add_argument("--progress", action="store_true", help="show the progress bar even without a terminal")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--fail-on-deny", action="store_true", help="exit 1 when any batch is denied")
    p.set_defaults(func=_cmd_replay, handler=_cmd_replay)
    v = subparsers.add_parser("verify", help="re-run a replay report from its manifest and compare",
                              description="Exit 0 iff inputs, policy and every verdict are identical.")
    v.add_argument("report")
    v.add_argument("--bootstrap-servers", help="override the cluster named in the manifest")
    v.set_defaults(func=_cmd_verify, handler=_cmd_verify)


def main(argv: list[str] | None = None) -> int:
    """``python -m monitor.replay replay|verify ...`` (the same as ``agent-monitor replay|verify``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="agent-monitor")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.argv_ = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
