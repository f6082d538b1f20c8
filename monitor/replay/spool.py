"""Where a replay keeps what it does not need in memory: each session's recent verdicts
(:class:`VerdictSpill`) and every batch's result (:class:`ResultStore`), in SQLite files of its
working folder.

Example::

    >>> spill = VerdictSpill()
    >>> spill["s\x1fb1"] = {"decision": "allow"}
    >>> spill.get("s\x1fb1"), spill.get("other", "none")
    ({'decision': 'allow'}, 'none')
"""

from __future__ import annotations

import marshal
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from monitor.report import BatchChange, BatchResult


class VerdictSpill:
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
        return marshal.loads(raw) if raw is not None else default  # noqa: S302 - written by __setitem__

    def pop(self, key: str, default: Any = None) -> Any:
        # a forgotten verdict is never read again (the head no longer lists its batch): leave it
        return self.pending.pop(key, None)

    def flush(self) -> None:
        self.db.executemany("INSERT OR REPLACE INTO v VALUES (?, ?)", self.pending.items())
        self.pending.clear()

    def close(self) -> None:
        self.db.close()


class ResultStore:
    """Per-batch results on disk (SQLite), so memory does not grow with the number of batches."""

    def __init__(self, directory: str, name: str = "results", *, create: bool = True) -> None:
        self.path = os.path.join(directory, f"{name}.sqlite")
        self.db = sqlite3.connect(self.path)
        self._rows: list[tuple[Any, ...]] = []
        self._changes: list[tuple[Any, ...]] = []
        if not create:
            return
        self.db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
            "CREATE TABLE batches (session TEXT, ord INTEGER, joined INTEGER, result TEXT, raw BLOB);"
            "CREATE TABLE changes (session TEXT, ord INTEGER, data TEXT);"
        )

    @classmethod
    def open(cls, path: str) -> ResultStore:
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

    def session_rows(self, with_raw: bool) -> Iterator[tuple[str, list[tuple[Any, ...]]]]:
        """(session, rows) in session order; rows are (ord, joined, result[, raw])."""
        cols = "session, ord, joined, result" + (", raw" if with_raw else "")
        cur = self.db.execute(f"SELECT {cols} FROM batches ORDER BY session, ord")  # noqa: S608 - fixed columns
        current: str | None = None
        rows: list[tuple[Any, ...]] = []
        for row in cur:
            if row[0] != current:
                if current is not None:
                    yield current, rows
                current, rows = row[0], []
            rows.append(row[1:])
        if current is not None:
            yield current, rows

    def raw_rows(self, session: str) -> list[tuple[Any, ...]]:
        return self.db.execute("SELECT ord, joined, result, raw FROM batches WHERE session=? ORDER BY ord",
                               (session,)).fetchall()

    def changes(self) -> Iterator[tuple[str, list[BatchChange]]]:
        cur = self.db.execute("SELECT session, data FROM changes ORDER BY session, ord")
        current: str | None = None
        items: list[BatchChange] = []
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
