"""Where a replay reads batches: trace files and folders (:class:`FileSource`), or a range of a
cluster's events topic (:class:`KafkaSource`), both a :class:`Source`.

A source yields :class:`Item` s in reading order: a batch decoded exactly as the live worker
decodes it, or the bad input that says why a record is none. With ``shard=(k, n)`` it yields only
the items of the sessions of shard ``k`` (:func:`shard_of`), so ``n`` processes can share one input.

Example::

    >>> import json, pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "t.json").write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "robot"}]))
    >>> src = FileSource([str(d)])
    >>> [(i.batch.batch_id if i.batch else i.bad.reason[:22]) for i in src], src.done == src.total
    (['0', 'not a valid EventBatch'], True)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from monitor.core import (
    LONE_SURROGATE,
    TOO_DEEP,
    IntDigits,
    Rejected,
    decode_batch,
    huge_int_in,
    huge_int_reason,
    is_unicode,
)
from monitor.models import EventBatch, SourceRef
from monitor.replay.request import ReplayError, ReplayRequest
from monitor.report import BadInput, InputFile, Inputs, KafkaInput, PartitionRange
from monitor.samples import validation_errors

TRACE_SUFFIXES = (".json",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(slots=True)
class Item:
    """One batch read from a source, or one piece of bad input."""

    where: str
    batch: EventBatch | None = None
    bad: BadInput | None = None
    raw: bytes | None = None  # the record as read (JSONL line, Kafka value), kept for evidence
    ref: SourceRef | None = None
    rejected: Rejected | None = None  # the worker still denies it if it has ids
    # a rejected record's deny is remembered in its session's state (as the worker does when the
    # record's key is its session id: the state lives on that key's partition), else only sent
    remember: bool = True

    @property
    def session_id(self) -> str | None:
        """The session it belongs to, as far as it can be read (a batch's, or a refused record's)."""
        if self.batch is not None:
            return self.batch.session_id
        return self.rejected.session_id if self.rejected is not None else None


class Source(Protocol):
    """Batches to replay, in reading order; ``done`` of ``total`` (bytes or records) read so far."""

    total: int
    done: int

    def __iter__(self) -> Iterator[Item]: ...

    def describe(self) -> Inputs:
        """What was read, for the report's manifest (complete once iterated)."""
        ...


def _reason(exc: ValidationError) -> str:
    errs = exc.errors(include_url=False)
    if errs and errs[0].get("type") == "json_invalid":
        return f"not JSON: {errs[0].get('ctx', {}).get('error', errs[0]['msg'])}"
    return "not a valid EventBatch: " + validation_errors(exc)


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
        self.paths = list(paths)
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
        self._huge = False  # the file being read holds integers too long to convert

    def describe(self) -> Inputs:
        """The paths as given and every file read, with its sha256."""
        return Inputs(roots=list(self.paths), files=self.read)

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
            if self.shards == 1 or shard_of(item.session_id, self.shards) == self.shard:
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
        digits = IntDigits()  # an integer too long to read fails its record only, not the file
        try:
            doc = json.loads(data, parse_int=digits)
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
        self._huge = digits.longest > 0
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
            if self._huge and huge_int_in(fields):
                reason = huge_int_reason(huge_int_in(fields))
            elif self._check_text and not is_unicode(fields):
                reason = LONE_SURROGATE
            else:
                return Item(where, batch=EventBatch.model_validate(fields))
        except ValidationError as exc:
            reason = _reason(exc)
        return Item(where, bad=BadInput(where=where, file=path, reason=reason))

    def _record(self, where: str, path: str, obj: dict[str, Any]) -> Item:
        """An EventBatch in a .json file, taken exactly as the same record in JSONL or on the
        topic: the worker's decoding (size limit, reasons, a deny when its ids can be read)."""
        if self._huge and huge_int_in(obj):
            sid, bid = obj.get("session_id"), obj.get("batch_id")
            rej = Rejected("invalid", huge_int_reason(huge_int_in(obj)),
                           sid if isinstance(sid, str) and sid else None, bid if isinstance(bid, str) and bid else None)
            return Item(where, bad=BadInput(where=where, file=path, reason=rej.reason), rejected=rej)
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
        for i, n in zip(starts, self._numbered(sid, len(starts)), strict=True):
            chunk = events[i:i + step]
            fields = {"session_id": sid, "batch_id": str(n), "seq": n, "events": chunk,
                      "policy": obj.get("policy"), "metadata": obj.get("metadata") or {}}
            item = self._item(f"{where}#events[{i}]", path, fields)
            if item.batch is not None or step == 1:
                yield item
                continue
            # a malformed event is reported on its own, and its batch goes on without it
            good, bad = [], []
            for j, event in enumerate(chunk):
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


def parse_time(value: str | None) -> int | None:
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
        self.ranges = self._plan(partitions, parse_time(from_time), parse_time(to_time),
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

    def describe(self) -> Inputs:
        """The topic, and per partition the offsets planned and the records read."""
        return Inputs(kafka=KafkaInput(bootstrap_servers=self.bootstrap_servers, topic=self.topic,
                                       partitions=self.ranges, from_time=self.from_time, to_time=self.to_time))

    def __iter__(self) -> Iterator[Item]:
        from confluent_kafka import KafkaError, TopicPartition

        todo = {r.partition: r for r in self.ranges if r.end > r.start}
        if todo:
            self.consumer.assign([TopicPartition(self.topic, p, r.start) for p, r in todo.items()])
        last = time.monotonic()
        try:
            while todo:
                msg: Any = self.consumer.poll(0.5)  # (a record's partition and offset are set)
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
                    if err.code() == KafkaError._PARTITION_EOF:  # noqa: SLF001 - librdkafka's name
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



def shard_of(session_id: str | None, shards: int) -> int:
    """Which shard evaluates a session: stable across processes and runs (crc32, not hash())."""
    if shards <= 1 or not session_id:
        return 0
    # surrogatepass: an id json read with a lone surrogate still has a shard (its record is refused there)
    return zlib.crc32(session_id.encode("utf-8", "surrogatepass")) % shards


def kafka_source(req: ReplayRequest, shard: tuple[int, int] = (0, 1)) -> KafkaSource:
    """The topic range ``req`` names, planned (its end offsets fixed now)."""
    if not req.bootstrap_servers:
        raise ReplayError("a topic replay needs --bootstrap-servers (or KAFKA_BOOTSTRAP_SERVERS)")
    if req.publish_prefix and req.topic and req.topic.startswith(req.publish_prefix + "."):
        raise ReplayError(f"--publish {req.publish_prefix!r} is the prefix of the topic being replayed: "
                          "replay never writes to the topics it reads")
    return KafkaSource(req.bootstrap_servers, req.topic or "", from_time=req.from_time, to_time=req.to_time,
                       from_offsets=req.from_offsets, to_offsets=req.to_offsets, partitions=req.partitions,
                       max_record_bytes=req.max_record_bytes, shard=shard)


def open_source(req: ReplayRequest, shard: tuple[int, int] = (0, 1)) -> Source:
    """The source ``req`` reads: its topic range, or its trace files."""
    if req.topic:
        return kafka_source(req, shard)
    return FileSource(req.inputs, trace_batch=req.trace_batch, max_record_bytes=req.max_record_bytes, shard=shard)
