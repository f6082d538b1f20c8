"""The policy registry: versioned, signed policies on a compacted Kafka topic, ``<prefix>.policies``.

Records are :class:`~monitor.models.PolicyRecord` values (JSON) under three kinds of key:

- ``<id>``: the active version of policy ``<id>``, what workers serve (compaction keeps the latest);
- ``<id>#shadow``: a candidate version that runs beside the active one on live traffic, its
  verdicts to ``<prefix>.shadow`` only (a tombstone ends it);
- ``<id>@<version>``: every version ever published, as Confluent's Schema Registry keeps one key
  per subject and version, so compaction never erases history (``policy history``, ``show``,
  ``diff`` and ``rollback`` read these).

Versions are numbered per id, 1, 2, 3, ...: publishing, rolling back (a new version with an old
text) and shadowing each take the next number; promoting turns the candidate into the active
version under its own number. The active version of an id is its highest-numbered active record,
under either kind of key, so replaying an old signed record cannot roll a worker back. The topic
has one partition, so every reader sees one order.

Example (needs a broker)::

    from monitor.registry import Registry
    reg = Registry("127.0.0.1:9092", prefix="agent")
    record = reg.publish(prepare_record("examples/policies/send_after_keyword.gr", "send", author="ops"))
    print(record.version, reg.read().active("send").sha256)
"""

from __future__ import annotations

import difflib
import getpass
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from monitor import signing
from monitor.config import TopicNames
from monitor.errors import EXIT_FAILED, EXIT_USAGE, MonitorError
from monitor.models import POLICY_ID_PATTERN, Action, PolicyRecord, Stage, utcnow
from monitor.policy import LoadedPolicy, load_policy_text, policy_files, read_policy_file, rule_message, sha256_text

log = logging.getLogger("agent_monitor.registry")
# librdkafka's own lines (retries while a coordinator loads) go to logging, not to stderr
_KAFKA_LOG = logging.getLogger("agent_monitor.registry.kafka")

SHADOW_SUFFIX = "#shadow"
VERSION_SEP = "@"
_POLICY_ID = re.compile(POLICY_ID_PATTERN)


class RegistryError(MonitorError):
    """A registry operation cannot be done (unknown id or version, a bad --action, a conflict)."""

    exit_code = EXIT_USAGE


class RecordRefused(MonitorError):
    """A worker does not take a registry record; ``reason`` is the metric label."""

    exit_code = EXIT_FAILED

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


REFUSAL_REASONS = ("invalid", "signature", "unsafe", "stale")
"""Why a worker refuses a record: not a valid record or policy; unsigned or signed by no trusted
key; refused by the policy sandbox; an older version than the one active."""


# -- keys -------------------------------------------------------------------------------------------

def check_policy_id(policy_id: str) -> str:
    """``policy_id`` if it can name a registry policy; :class:`RegistryError` otherwise.

    >>> check_policy_id("send-after.v2")
    'send-after.v2'
    """
    if not _POLICY_ID.match(policy_id):
        raise RegistryError(f"policy id {policy_id!r}: use 1-128 letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit")
    return policy_id


def record_key(policy_id: str, stage: Stage = "active") -> str:
    """The key workers follow: ``<id>`` for the active version, ``<id>#shadow`` for a candidate."""
    return policy_id + (SHADOW_SUFFIX if stage == "shadow" else "")


def version_key(policy_id: str, version: int) -> str:
    """The key that keeps one version for good: ``<id>@<version>``."""
    return f"{policy_id}{VERSION_SEP}{version}"


@dataclass(frozen=True)
class Key:
    """A registry record key, read: which policy, and which kind of record.

    >>> Key.parse("send#shadow"), Key.parse("send@3").version
    (Key(policy_id='send', kind='shadow', version=None), 3)
    """

    policy_id: str
    kind: str  # "active", "shadow" or "version"
    version: int | None = None

    @classmethod
    def parse(cls, key: str) -> "Key":
        if key.endswith(SHADOW_SUFFIX):
            return cls(key[: -len(SHADOW_SUFFIX)], "shadow")
        head, sep, tail = key.rpartition(VERSION_SEP)
        if sep and tail.isdigit():
            return cls(head, "version", int(tail))
        return cls(key, "active")


# -- what was read ----------------------------------------------------------------------------------

@dataclass
class RegistryView:
    """The registry as read: per policy id, every version, the active one and the candidate."""

    versions: dict[str, dict[int, PolicyRecord]] = field(default_factory=dict)
    heads: dict[str, PolicyRecord] = field(default_factory=dict)
    shadows: dict[str, PolicyRecord] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)  # keys whose value is no PolicyRecord

    def add(self, key: str, value: bytes | None) -> None:
        """Take one record of the topic, in topic order."""
        k = Key.parse(key)
        if value is None:  # a tombstone: only a candidate can be withdrawn
            if k.kind == "shadow":
                self.shadows.pop(k.policy_id, None)
            return
        try:
            record = PolicyRecord.model_validate_json(value)
        except ValidationError as exc:
            self.unreadable.append(f"{key}: {exc.errors()[0]['msg']}")
            return
        if record.policy_id != k.policy_id:
            self.unreadable.append(f"{key}: holds policy {record.policy_id!r}")
            return
        self.versions.setdefault(record.policy_id, {})[record.version] = record
        if k.kind == "active":
            self.heads[record.policy_id] = record
        elif k.kind == "shadow":
            self.shadows[record.policy_id] = record

    def ids(self) -> list[str]:
        return sorted(self.versions)

    def active(self, policy_id: str) -> PolicyRecord | None:
        """The highest-numbered active record of ``policy_id`` (under any key)."""
        actives = [r for r in self.versions.get(policy_id, {}).values() if r.stage == "active"]
        head = self.heads.get(policy_id)
        if head is not None:
            actives.append(head)
        return max(actives, key=lambda r: r.version, default=None)

    def candidate(self, policy_id: str) -> PolicyRecord | None:
        """The shadow candidate, if one is published and newer than the active version."""
        shadow = self.shadows.get(policy_id)
        active = self.active(policy_id)
        if shadow is None or (active is not None and shadow.version <= active.version):
            return None
        return shadow

    def version(self, policy_id: str, version: int) -> PolicyRecord:
        found = self.versions.get(policy_id, {}).get(version)
        if found is None:
            known = ", ".join(str(v) for v in sorted(self.versions.get(policy_id, {}))) or "none"
            raise RegistryError(f"policy {policy_id!r} has no version {version} (versions: {known})")
        return found

    def history(self, policy_id: str) -> list[PolicyRecord]:
        if policy_id not in self.versions:
            raise RegistryError(f"no policy {policy_id!r} in the registry (policies: "
                                f"{', '.join(self.ids()) or 'none'})")
        return [self.versions[policy_id][v] for v in sorted(self.versions[policy_id])]

    def next_version(self, policy_id: str) -> int:
        return max(self.versions.get(policy_id, {0: None}), default=0) + 1


# -- building a record ------------------------------------------------------------------------------

def parse_action_args(items: Iterable[str]) -> list[tuple[str, Action]]:
    """``["2=log", "Secret in code=block"]`` -> ``[("2", "log"), ("Secret in code", "block")]``.

    >>> parse_action_args(["0=log"])
    [('0', 'log')]
    """
    out: list[tuple[str, Action]] = []
    for item in items:
        rule, sep, action = item.rpartition("=")
        action = action.strip().lower()
        if not sep or not rule.strip() or action not in ("block", "log"):
            raise RegistryError(f"--action {item!r}: expected RULE=block or RULE=log (RULE: a rule index, "
                                "or a rule's message)")
        out.append((rule.strip(), action))  # type: ignore[arg-type]
    return out


def resolve_actions(policy: LoadedPolicy, overrides: Iterable[tuple[str, Action]]) -> dict[int, Action]:
    """Every rule's action: the ``[action=...]`` tags, then ``overrides`` by rule index or message."""
    messages = [rule_message(r) for r in policy.rules]
    actions = policy.rule_actions()
    for rule, action in overrides:
        if rule.isdigit():
            index = int(rule)
            if index >= len(messages):
                raise RegistryError(f"--action {rule}={action}: the policy has rules 0-{len(messages) - 1}")
        else:
            hits = [i for i, m in enumerate(messages) if m == rule]
            if len(hits) != 1:
                listed = "; ".join(f"{i}: {m}" for i, m in enumerate(messages))
                raise RegistryError(f"--action {rule!r}={action}: {'no' if not hits else 'more than one'} rule has "
                                    f"that message (rules: {listed})")
            index = hits[0]
        actions[index] = action
    return actions


def read_policy_source(path: str | Path) -> tuple[str, list[str]]:
    """The text a file or folder publishes (a folder's files combined in name order, as the worker
    combines them) and its source files."""
    files = policy_files(path)
    texts = []
    for f in files:
        text = read_policy_file(f)
        load_policy_text(text, f.stem, str(f))  # each file alone first: errors name the file and line
        texts.append(text if text.endswith("\n") else text + "\n")
    return "\n".join(texts), [str(f) for f in files]


def prepare_record(path: str | Path, policy_id: str, actions: Iterable[tuple[str, Action]] = (),
                   author: str | None = None, note: str | None = None) -> PolicyRecord:
    """A record for the policy at ``path`` (its version and stage are set when it is published).
    A policy that does not parse or that the sandbox refuses raises
    :class:`~monitor.policy.PolicyLoadError` (file:line and why) here, before any Kafka."""
    check_policy_id(policy_id)
    text, sources = read_policy_source(path)
    policy = load_policy_text(text, policy_id, sources[0] if len(sources) == 1 else None)
    resolved = resolve_actions(policy, actions)
    return PolicyRecord(policy_id=policy_id, version=1, text=text, sha256=sha256_text(text),
                        actions={str(i): a for i, a in sorted(resolved.items())},
                        rules=[rule_message(r) for r in policy.rules], author=author or _author(),
                        note=note, sources=sources)


def record_policy(record: PolicyRecord) -> LoadedPolicy:
    """The record's policy, parsed in the sandbox (:class:`~monitor.policy.PolicyLoadError` if it
    is refused or does not parse), with its version and actions."""
    policy = load_policy_text(record.text, record.policy_id, f"{record.policy_id}@{record.version}", cache=False)
    policy.version = record.version
    policy.actions = record.rule_actions()
    return policy


def sign_record(record: PolicyRecord, private: Any | None) -> PolicyRecord:
    """``record`` signed by ``private`` (unchanged, unsigned, when ``private`` is None)."""
    if private is None:
        return record.model_copy(update={"key_id": None, "signature": None})
    keyed = record.model_copy(update={"key_id": signing.key_id(private.public_key()), "signature": None})
    return keyed.model_copy(update={"signature": signing.sign(keyed.signed_bytes(), private)})


def check_record(key: str, value: bytes, trusted: list[Any]) -> PolicyRecord:
    """A record a worker may take, or :class:`RecordRefused` saying why (its reason a metric label).

    The policy itself is checked by :func:`record_policy` (sandbox and parser) after this.
    """
    try:
        record = PolicyRecord.model_validate_json(value)
    except ValidationError as exc:
        raise RecordRefused("invalid", f"{key}: not a policy record: {exc.errors()[0]['msg']}") from None
    k = Key.parse(key)
    if record.policy_id != k.policy_id or (k.kind == "version" and record.version != k.version) or (
            k.kind in ("active", "shadow") and record.stage != k.kind):
        raise RecordRefused("invalid", f"{key}: the key does not match the record (policy "
                            f"{record.policy_id!r}, version {record.version}, {record.stage})")
    if trusted:
        try:
            signing.verify(record.signed_bytes(), record.signature, trusted)
        except signing.SignatureInvalid as exc:
            raise RecordRefused("signature", f"{key} (version {record.version}): {exc}") from None
    return record


def diff_records(a: PolicyRecord, b: PolicyRecord) -> str:
    """A unified diff of two versions' texts, then their actions that differ."""
    lines = list(difflib.unified_diff(a.text.splitlines(keepends=True), b.text.splitlines(keepends=True),
                                      f"{a.policy_id}@{a.version}", f"{b.policy_id}@{b.version}"))
    out = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
    for index in sorted(set(a.actions) | set(b.actions), key=int):
        if a.actions.get(index) != b.actions.get(index):
            out += f"action of rule {index}: {a.actions.get(index, '-')} -> {b.actions.get(index, '-')}\n"
    return out or f"versions {a.version} and {b.version} are the same\n"


# -- the topic --------------------------------------------------------------------------------------

def _ends(consumer: Any, topic: str, partitions: Iterable[int], deadline: float) -> dict[int, int]:
    """Each partition's end offset; a topic created a moment ago may have no leader yet: retry."""
    from confluent_kafka import KafkaException, TopicPartition

    ends: dict[int, int] = {}
    for p in partitions:
        while True:
            try:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p),
                                                           timeout=max(1.0, deadline - time.monotonic()))
                ends[p] = high if high > low else 0
                break
            except KafkaException as exc:
                if time.monotonic() >= deadline:
                    raise RegistryError(f"cannot read the end of {topic}[{p}]: {exc.args[0].str()}") from None
                time.sleep(0.2)
    return ends


def read_records(bootstrap: str, topic: str, timeout: float = 30.0) -> list[tuple[str, bytes | None]]:
    """Every record of ``topic`` from the beginning to its end as of now, in order."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"agent-monitor-registry-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest", "logger": _KAFKA_LOG})
    out: list[tuple[str, bytes | None]] = []
    try:
        md = consumer.list_topics(topic, timeout=timeout)
        meta = md.topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            return []
        deadline = time.monotonic() + timeout
        ends = {p: end for p, end in _ends(consumer, topic, meta.partitions, deadline).items() if end}
        if not ends:
            return []
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        positions = dict.fromkeys(ends, 0)
        while any(positions[p] < ends[p] for p in ends):
            if time.monotonic() > deadline:
                raise RegistryError(f"reading {topic} timed out after {timeout:.0f}s")
            m = consumer.poll(0.2)
            if m is None:
                continue
            if m.error():
                continue
            partition, offset, key = m.partition(), m.offset(), m.key()
            if partition is None or offset is None:  # (only error events lack them)
                continue
            positions[partition] = offset + 1
            out.append((key.decode("utf-8", "replace") if key else "", m.value()))
    except KafkaException as exc:
        raise RegistryError(f"cannot read {topic}: {exc.args[0].str()}") from None
    finally:
        consumer.close()
    return out


class Registry:
    """Reads and writes one deployment's registry topic (the ``policy`` commands use this)."""

    def __init__(self, bootstrap: str, prefix: str, signing_key: Any | None = None, timeout: float = 30.0) -> None:
        self.bootstrap = bootstrap
        self.topic = TopicNames.for_prefix(prefix).policies
        self.prefix = prefix
        self.signing_key = signing_key
        self.timeout = timeout

    def read(self) -> RegistryView:
        view = RegistryView()
        for key, value in read_records(self.bootstrap, self.topic, self.timeout):
            view.add(key, value)
        return view

    def publish(self, record: PolicyRecord, stage: Stage = "active") -> PolicyRecord:
        """Publish ``record`` as the next version of its policy (``stage="shadow"``: a candidate)."""
        view = self.read()
        version = view.next_version(record.policy_id)
        final = sign_record(record.model_copy(update={"version": version, "stage": stage, "created_at": utcnow()}),
                            self.signing_key)
        writes: list[tuple[str, PolicyRecord | None]] = [(version_key(final.policy_id, version), final),
                                                         (record_key(final.policy_id, stage), final)]
        if stage == "active" and final.policy_id in view.shadows:
            writes.append((record_key(final.policy_id, "shadow"), None))  # an older candidate ends
        self._write(writes)
        self._check_won(final)
        return final

    def rollback(self, policy_id: str, to: int, author: str | None = None) -> PolicyRecord:
        """A new active version with version ``to``'s text and actions."""
        old = self.read().version(policy_id, to)
        record = old.model_copy(update={"author": author or _author(), "note": f"rollback to v{to}"})
        return self.publish(record, "active")

    def promote(self, policy_id: str, author: str | None = None) -> PolicyRecord:
        """Make the shadow candidate the active version, under its own version number."""
        view = self.read()
        candidate = view.candidate(policy_id)
        if candidate is None:
            active = view.active(policy_id)
            raise RegistryError(f"policy {policy_id!r} has no shadow candidate newer than its active version "
                                f"{active.version if active else '(none)'}: publish one with --shadow")
        final = sign_record(candidate.model_copy(update={
            "stage": "active", "created_at": utcnow(), "author": author or _author(),
            "note": f"promoted from shadow (published by {candidate.author or 'unknown'})"}), self.signing_key)
        self._write([(version_key(policy_id, final.version), final), (record_key(policy_id, "active"), final),
                     (record_key(policy_id, "shadow"), None)])
        return final

    def _write(self, writes: list[tuple[str, PolicyRecord | None]]) -> None:
        from confluent_kafka import Producer

        from monitor.topics import create_topics

        create_topics(self.bootstrap, self.prefix, only=("policies",))  # a first publish makes its topic
        errors: list[str] = []

        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(err.str())

        producer = Producer({"bootstrap.servers": self.bootstrap, "acks": "all", "enable.idempotence": True,
                             "message.max.bytes": 2_097_152, "on_delivery": delivered, "logger": _KAFKA_LOG})
        for key, record in writes:
            value = None if record is None else record.model_dump_json().encode()
            producer.produce(self.topic, value, key.encode())
        left = producer.flush(self.timeout)
        if left or errors:
            raise RegistryError(f"the registry write failed: {'; '.join(errors) or f'{left} record(s) unsent'}")

    def _check_won(self, mine: PolicyRecord) -> None:
        """Two publishers that read the same registry pick the same version: the first record of a
        version is the one workers keep. Say so if that is not ours."""
        first: PolicyRecord | None = None
        for key, value in read_records(self.bootstrap, self.topic, self.timeout):
            if value is None or Key.parse(key) != Key(mine.policy_id, "version", mine.version):
                continue
            first = PolicyRecord.model_validate_json(value)
            break
        if first is not None and (first.sha256, first.created_at) != (mine.sha256, mine.created_at):
            raise RegistryError(f"another publisher wrote version {mine.version} of {mine.policy_id!r} at the same "
                                "time; workers keep theirs: read the registry (policy history) and publish again")


def _author() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# -- the worker's side ------------------------------------------------------------------------------

@dataclass
class PolicyUpdate:
    """A registry record a worker took, parsed in the sandbox and ready to serve."""

    record: PolicyRecord
    policy: LoadedPolicy
    stage: Stage = "active"
    withdrawn: bool = False  # a candidate's tombstone: ``record`` is the candidate withdrawn
    received: float = field(default_factory=time.monotonic)


class RegistryFollower:
    """A worker's view of the registry: reads it from the beginning, then follows it on a thread
    of its own, handing over each version it takes, checked (signature, version, sandbox) and
    parsed there, never on the worker's loop (parsing takes 100-200 ms; building the engine, a
    few ms, is left to the worker, which swaps at a batch boundary).

    ``on_refused(reason, message)`` is told about every record refused (the worker logs and counts
    it, and keeps the version it has). The worker calls :meth:`updates` at each batch boundary:
    one attribute read when nothing changed.
    """

    def __init__(self, bootstrap: str, prefix: str, trusted: list[Any] | None = None,
                 on_refused: Callable[[str, str], None] | None = None) -> None:
        import threading

        self.bootstrap = bootstrap
        self.topic = TopicNames.for_prefix(prefix).policies
        self.trusted = list(trusted or [])
        self.on_refused = on_refused
        self.active: dict[str, PolicyRecord] = {}  # what this follower took, per id
        self.shadow: dict[str, PolicyRecord] = {}
        self.refused: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)
        self._pending: list[PolicyUpdate] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Any = None

    # -- reading ----------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Read the registry to its end (the versions to serve from the start: :meth:`updates`
        hands them over), then follow it on a thread."""
        import threading

        from confluent_kafka import Consumer, TopicPartition

        self._consumer = Consumer({
            "bootstrap.servers": self.bootstrap, "group.id": f"agent-monitor-registry-{uuid.uuid4().hex}",
            "enable.auto.commit": False, "auto.offset.reset": "earliest", "fetch.wait.max.ms": 50,
            "topic.metadata.refresh.interval.ms": 5000, "logger": _KAFKA_LOG})
        deadline = time.monotonic() + timeout
        md = self._consumer.list_topics(self.topic, timeout=timeout)
        parts = list(md.topics[self.topic].partitions) if self.topic in md.topics else [0]
        ends = _ends(self._consumer, self.topic, parts, deadline)
        self._consumer.assign([TopicPartition(self.topic, p, 0) for p in parts])
        positions = dict.fromkeys(parts, 0)
        records: list[tuple[bytes | None, bytes | None]] = []
        while any(positions[p] < ends[p] for p in parts):
            if time.monotonic() > deadline:
                raise RegistryError(f"reading {self.topic} to its end took over {timeout:.0f}s")
            m = self._consumer.poll(0.2)
            if m is None or m.error():
                continue
            positions[m.partition()] = m.offset() + 1
            records.append((m.key(), m.value()))
        self.take_all(records)
        self._thread = threading.Thread(target=self._follow, name="policy-registry", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        while not self._stop.is_set():
            m = self._consumer.poll(0.1)
            if m is None or m.error():
                continue
            try:
                self._take(m.key(), m.value())
            except Exception:  # noqa: BLE001 - one bad record never stops the follower
                log.exception("policy registry record at offset %s", m.offset())

    def updates(self) -> list[PolicyUpdate]:
        """The versions taken since the last call, in topic order (cheap when there are none)."""
        if not self._pending:
            return []
        with self._lock:
            out, self._pending = self._pending, []
        return out

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._consumer is not None:
            self._consumer.close()

    # -- one record -------------------------------------------------------------------------------

    def _refuse(self, exc: RecordRefused) -> None:
        self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
        log.warning("policy registry: refused %s; the version in service stays", exc)
        if self.on_refused is not None:
            self.on_refused(exc.reason, str(exc))

    def take_all(self, records: list[tuple[bytes | None, bytes | None]]) -> None:
        """The registry as read to its end at start: only the version each policy serves is
        parsed (parsing takes 100-200 ms, and a registry holds every version ever published): its
        highest valid active version, falling back to the one before when the sandbox or the
        parser refuses it, and its candidate if one is newer."""
        actives: dict[str, dict[int, PolicyRecord]] = {}
        shadows: dict[str, PolicyRecord | None] = {}
        for raw_key, value in records:
            key = raw_key.decode("utf-8", "replace") if raw_key else ""
            k = Key.parse(key)
            if value is None:
                if k.kind == "shadow":
                    shadows[k.policy_id] = None
                continue
            try:
                record = check_record(key, value, self.trusted)
            except RecordRefused as exc:
                self._refuse(exc)
                continue
            if record.stage == "active":
                actives.setdefault(record.policy_id, {})[record.version] = record
            elif k.kind == "shadow":
                shadows[record.policy_id] = record
        for policy_id in sorted(actives):
            for version in sorted(actives[policy_id], reverse=True):
                if self._accept(f"{policy_id}@{version}", actives[policy_id][version]):
                    break
        for policy_id, candidate in sorted(shadows.items()):
            active = self.active.get(policy_id)
            if candidate is not None and (active is None or candidate.version > active.version):
                self._accept(record_key(policy_id, "shadow"), candidate)

    def _accept(self, key: str, record: PolicyRecord) -> bool:
        """Parse ``record`` in the sandbox and hand it over; False (refused, counted) if it fails."""
        try:
            policy = record_policy(record)
        except MonitorError as exc:  # PolicyLoadError: refused by the sandbox, or not parsed
            reason = "unsafe" if "policy sandbox" in str(exc) else "invalid"
            self._refuse(RecordRefused(reason, f"{key} (version {record.version}): {exc}"))
            return False
        if record.stage == "active":
            self.active[record.policy_id] = record
            if record.policy_id in self.shadow and self.shadow[record.policy_id].version <= record.version:
                del self.shadow[record.policy_id]  # the candidate was promoted (or overtaken)
        else:
            self.shadow[record.policy_id] = record
        self._hand_over(PolicyUpdate(record, policy, record.stage))
        return True

    def _take(self, raw_key: bytes | None, value: bytes | None) -> None:
        key = raw_key.decode("utf-8", "replace") if raw_key else ""
        k = Key.parse(key)
        if value is None:
            current = self.shadow.get(k.policy_id)
            if k.kind == "shadow" and current is not None:
                del self.shadow[k.policy_id]
                self._hand_over(PolicyUpdate(current, LoadedPolicy(current.text, k.policy_id, current.sha256),
                                             stage="shadow", withdrawn=True))
            return
        try:
            record = check_record(key, value, self.trusted)
            stage = record.stage
            if k.kind == "version" and stage == "shadow":
                return  # a candidate's history: the candidate itself comes under <id>#shadow
            current = self.active.get(record.policy_id)
            if current is not None and record.version <= current.version:
                if record.version == current.version and record.sha256 == current.sha256:
                    return  # the same version under its other key
                raise RecordRefused("stale", f"{key}: version {record.version} is not newer than the active "
                                    f"version {current.version}")
            if stage == "shadow":
                held = self.shadow.get(record.policy_id)
                if held is not None and held.version == record.version and held.sha256 == record.sha256:
                    return
        except RecordRefused as exc:
            self._refuse(exc)
            return
        self._accept(key, record)

    def _hand_over(self, update: PolicyUpdate) -> None:
        with self._lock:
            self._pending.append(update)


def describe_record(record: PolicyRecord) -> str:
    """One line about a record, for people."""
    signed = f"signed by {record.key_id}" if record.signature else "unsigned"
    logged = sum(1 for a in record.actions.values() if a == "log")
    return (f"{record.policy_id} v{record.version} ({record.stage}) sha256 {record.sha256[:12]}, "
            f"{len(record.rules)} rule{'s' if len(record.rules) != 1 else ''}"
            f"{f' ({logged} logged)' if logged else ''}, {signed}, by {record.author or 'unknown'} "
            f"at {record.created_at:%Y-%m-%d %H:%M:%S}Z{f'; {record.note}' if record.note else ''}")


def record_json(record: PolicyRecord) -> str:
    return json.dumps(record.model_dump(mode="json"), indent=2, ensure_ascii=False)
