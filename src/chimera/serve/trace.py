"""SQLite trace store: every call and every feedback score, written off the event loop by one writer thread.

Hostile rows cannot break it: values are made storable before they are queued (`_storable`), the queue is bounded
(`max_backlog`; a row that does not fit is dropped and counted, the caller never waits), and the writer thread
survives any failure (a failing batch is retried row by row; what still fails is dropped, counted and logged, at
most one log line a second). `stats()` reports what happened.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

log = logging.getLogger("chimera.serve.trace")

CALL_COLUMNS = (
    "workflow_id", "stage", "call_id", "model", "backend", "prompt_tokens", "completion_tokens", "queued_at",
    "dispatched_at", "first_token_at", "ended_at", "status", "error", "confidences", "pred_call_tokens",
    "pred_remaining_tokens", "policy", "kind", "prompt", "identity", "propensity", "explored", "epsilon", "terms",
    "weights", "predictor_version",
)
# Columns added after the first release: (name, SQL type); old trace files get them by ALTER TABLE on open.
# The routing decision's randomisation (propensity, explored, epsilon) and inputs (terms: per scorer, per model, the
# unweighted value; weights: the scorer weights) are what off-policy evaluation reads (chimera.train.ope).
_ADDED_COLUMNS = (("kind", "TEXT"), ("prompt", "TEXT"), ("identity", "TEXT"), ("propensity", "REAL"),
                  ("explored", "INTEGER"), ("epsilon", "REAL"), ("terms", "TEXT"), ("weights", "TEXT"),
                  ("predictor_version", "TEXT"))
_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    workflow_id TEXT, stage INTEGER, call_id TEXT, model TEXT, backend TEXT, prompt_tokens INTEGER,
    completion_tokens INTEGER, queued_at REAL, dispatched_at REAL, first_token_at REAL, ended_at REAL,
    status TEXT, error TEXT, confidences TEXT, pred_call_tokens REAL, pred_remaining_tokens REAL, policy TEXT,
    kind TEXT, prompt TEXT, identity TEXT, propensity REAL, explored INTEGER, epsilon REAL, terms TEXT,
    weights TEXT, predictor_version TEXT
);
CREATE INDEX IF NOT EXISTS calls_wf ON calls(workflow_id);
CREATE TABLE IF NOT EXISTS feedback (workflow_id TEXT, score REAL, at REAL);
"""
_TEXT_COLUMNS = frozenset({"workflow_id", "call_id", "model", "backend", "status", "error", "confidences", "policy",
                           "kind", "prompt", "identity", "terms", "weights", "predictor_version"})
_CALL_TEXT = tuple(c in _TEXT_COLUMNS for c in CALL_COLUMNS)
_INSERT = {
    "calls": f"INSERT INTO calls ({','.join(CALL_COLUMNS)}) VALUES ({','.join('?' * len(CALL_COLUMNS))})",
    "feedback": "INSERT INTO feedback (workflow_id, score, at) VALUES (?,?,?)",
}
_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1
_MAX_OTHER_CHARS = 1000  # str() of an unexpected value is cut to this many characters
_MAX_BATCH = 5000  # queue items the writer takes per iteration (one transaction)
BATCH_S = 0.05  # the writer gathers rows this long before a commit: one wake-up and one transaction per batch
_LOG_INTERVAL_S = 1.0  # at most one failure log line per this many seconds
_STOP = object()


def _text(s: str) -> str:
    """`s` as a plain str that encodes to UTF-8: lone surrogates become backslash escapes."""
    try:
        str.encode(s, "utf-8")
    except UnicodeEncodeError:
        return str.encode(s, "utf-8", "backslashreplace").decode("utf-8")
    return s if type(s) is str else str.__str__(s)


def _storable(v: Any, text: bool) -> Any:
    """`v` as a value sqlite stores: surrogates escaped, out-of-int64 ints and NaN/inf -> None (ints: their digits in
    TEXT columns), dicts -> JSON (None if not JSON-able), anything else -> str(v) cut to _MAX_OTHER_CHARS (or None)."""
    if v is None:
        return None
    if type(v) is str and v.isascii():  # most values: nothing to escape (a surrogate is not ASCII)
        return v
    if isinstance(v, str):
        return _text(v)
    if isinstance(v, int):  # bool included: stored as 0/1
        if _INT64_MIN <= v <= _INT64_MAX:
            return v
        if text:
            try:
                return str(int(v))
            except ValueError:  # beyond Python's int -> str digit limit
                return None
        return None
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        try:
            return json.dumps(v, allow_nan=False)  # ensure_ascii (the default) escapes surrogates too
        except (TypeError, ValueError, RecursionError):
            return None
    try:
        return _text(str(v)[:_MAX_OTHER_CHARS])
    except Exception:  # a __str__ that raises or returns a non-str
        return None


class _RateLimitedLog:
    """At most one warning per `interval` seconds; the next line that gets through says how many were held back."""

    def __init__(self, interval: float = _LOG_INTERVAL_S) -> None:
        self.interval = interval
        self._next_at = 0.0
        self._held_back = 0

    def warning(self, msg: str, *args: Any) -> bool:
        now = time.monotonic()
        if now < self._next_at:
            self._held_back += 1
            return False
        self._next_at = now + self.interval
        if self._held_back:
            msg, args = msg + " (%d more trace store failures not logged)", (*args, self._held_back)
            self._held_back = 0
        log.warning(msg, *args)
        return True


def _brief(e: BaseException) -> str:
    return ascii(f"{type(e).__name__}: {e}")[:300]


class TraceStore:
    """Rows are queued and committed in batches by a background thread so request handlers never wait on disk.

    Thread ownership of the counters: `_accepted` and `_dropped_full` are written by callers of log_call/log_feedback
    under `_cond`; `_written`, `_failed` and `_errors` only by the writer thread. `_lock` guards the connection.
    """

    def __init__(self, path: str | Path, max_backlog: int = 100_000, batch_s: float = BATCH_S) -> None:
        if max_backlog < 1:
            raise ValueError(f"max_backlog must be >= 1, got {max_backlog}")
        self.path = str(path)
        self.max_backlog = int(max_backlog)
        self.batch_s = float(batch_s)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # Queue of rows ("calls"|"feedback", values) and control items (flush Events, _STOP). Rows are bounded by
        # max_backlog; control items always get in, so flush()/close() work even when the backlog is full.
        self._buf: deque = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        # The writer waits for a first row (`_idle`: a row wakes it), then gathers rows for `batch_s` without being
        # woken per row (a thread wake-up costs the event loop more than the row); flush and close cut that short.
        self._idle = False
        self._urgent = False
        self._accepted = 0  # rows queued (callers' side)
        self._dropped_full = 0  # rows refused: backlog full or store closed (callers' side)
        self._written = 0  # rows committed (writer)
        self._failed = 0  # rows that could not be stored (writer)
        self._errors = 0  # writer iterations that raised (writer)
        self._dropped_full_logged = 0  # writer: how many refused rows have been reported in the log
        self._log = _RateLimitedLog()
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        have = {r[1] for r in self._db.execute("PRAGMA table_info(calls)")}
        for name, typ in _ADDED_COLUMNS:  # a trace file from before the column existed: add it (NULL in old rows)
            if name not in have:
                self._db.execute(f"ALTER TABLE calls ADD COLUMN {name} {typ}")
        self._db.commit()
        self._thread = threading.Thread(target=self._writer, name="chimera-trace", daemon=True)
        self._thread.start()

    # ---- writes (non-blocking) ------------------------------------------------------------------------------
    def log_call(self, row: dict[str, Any]) -> None:
        vals = row if isinstance(row, dict) else dict(row)
        self._put(("calls", tuple(_storable(vals.get(c), t) for c, t in zip(CALL_COLUMNS, _CALL_TEXT))))

    def log_feedback(self, workflow_id: str, score: float, at: float | None = None) -> None:
        try:
            score = float(score)
        except (TypeError, ValueError, OverflowError):
            score = None
        self._put(("feedback", (_storable(workflow_id, True), _storable(score, False),
                                time.time() if at is None else _storable(at, False))))

    def _put(self, item: tuple) -> None:
        """Queue a row, or drop and count it when the backlog is full or the store closed; never waits on the writer."""
        with self._cond:
            # Writer counters are read without its cooperation: they only grow, so a stale read only overestimates.
            if self._closed or self._accepted - self._written - self._failed >= self.max_backlog:
                self._dropped_full += 1
                return
            self._accepted += 1
            self._buf.append(item)
            if self._idle:
                self._idle = False
                self._cond.notify()

    # ---- the writer thread ------------------------------------------------------------------------------------
    def _take(self) -> list:
        """The next batch: wait for a first item, then up to `batch_s` for more (unless flush or close is waiting)."""
        with self._cond:
            while not self._buf:
                self._idle = True
                self._cond.wait()
            self._idle = False
            if not self._urgent and len(self._buf) < _MAX_BATCH:
                self._cond.wait(self.batch_s)
            self._urgent = False
            return [self._buf.popleft() for _ in range(min(len(self._buf), _MAX_BATCH))]

    def _wake(self) -> None:
        """A flush or close is waiting (under `_cond`): the writer stops gathering and writes now."""
        self._idle, self._urgent = False, True
        self._cond.notify()

    def _writer(self) -> None:
        stop = False
        while not stop:
            waiters: list[threading.Event] = []
            n_rows, base = 0, self._written + self._failed
            try:
                items = self._take()
                stop = any(it is _STOP for it in items)
                waiters = [it for it in items if isinstance(it, threading.Event)]
                queued = [it for it in items if it is not _STOP and not isinstance(it, threading.Event)]
                n_rows = len(queued)
                rows: dict[str, list[tuple]] = {"calls": [], "feedback": []}
                for table, values in queued:
                    rows[table].append(values)
                for table, batch in rows.items():
                    if batch:
                        self._write(table, batch)
                self._report_refused()
            except Exception as e:  # the loop goes on whatever happens; rows not yet accounted count as dropped
                self._errors += 1
                self._failed += max(0, n_rows - (self._written + self._failed - base))
                self._log.warning("trace writer iteration failed: %s", _brief(e))
                time.sleep(0.01)  # a persistent fault must not spin a core
            finally:
                for w in waiters:
                    w.set()

    def _write(self, table: str, batch: list[tuple]) -> None:
        """Commit `batch` in one transaction; if that fails, row by row (what still fails: dropped, counted, logged)."""
        sql = _INSERT[table]
        with self._lock:
            try:
                self._db.executemany(sql, batch)
                self._db.commit()
                self._written += len(batch)
                return
            except Exception:
                self._rollback()
            for r in batch:
                try:
                    self._db.execute(sql, r)
                    self._db.commit()
                    self._written += 1
                except Exception as e:
                    self._rollback()
                    self._failed += 1
                    self._log.warning("trace store: dropped a %s row that cannot be stored: %s", table, _brief(e))

    def _rollback(self) -> None:
        try:
            self._db.rollback()
        except Exception:  # noqa: BLE001 - nothing more to undo
            pass

    def _report_refused(self) -> None:
        n = self._dropped_full
        if n > self._dropped_full_logged and self._log.warning(
                "trace store: %d rows dropped, backlog full (max_backlog=%d) or store closed",
                n - self._dropped_full_logged, self.max_backlog):
            self._dropped_full_logged = n

    # ---- control ----------------------------------------------------------------------------------------------
    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is committed or dropped (tests, shutdown); False if `timeout` ran out.

        The flush marker bypasses max_backlog, so this works when the backlog is full."""
        ev = threading.Event()
        with self._cond:
            closing = self._closed
            if not closing:
                self._buf.append(ev)
                self._wake()
        if closing:  # close() has queued the stop marker: the writer empties the queue, then exits
            self._thread.join(timeout)
            return self.stats()["backlog"] == 0
        return ev.wait(timeout)

    def close(self) -> None:
        """Write what is queued, stop the writer (waits up to 10 s) and close the file; later rows are dropped.

        The stop marker bypasses max_backlog, so this works when the backlog is full."""
        with self._cond:
            if not self._closed:
                self._closed = True
                self._buf.append(_STOP)
                self._wake()
        self._thread.join(10)
        with self._lock:
            self._db.close()

    def stats(self) -> dict[str, Any]:
        """alive: writer thread running; backlog: rows queued, not yet written; written: rows committed;
        dropped: rows lost (backlog full, store closed, or unstorable); errors: writer iterations that raised."""
        written, failed, errors = self._written, self._failed, self._errors  # writer's first: backlog never < 0
        accepted, refused = self._accepted, self._dropped_full
        return {"alive": self._thread.is_alive(), "backlog": accepted - written - failed, "written": written,
                "dropped": refused + failed, "errors": errors}

    # ---- reads ---------------------------------------------------------------------------------------------
    def query(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        """Run a read query after flushing pending writes; rows as dicts (for tests and tooling)."""
        self.flush()
        with self._lock:
            cur = self._db.execute(sql, params)
            names = [d[0] for d in cur.description or ()]
            return [dict(zip(names, r)) for r in cur.fetchall()]
