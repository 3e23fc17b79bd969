"""SQLite trace store: every call and every feedback score, written off the event loop by one writer thread."""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

CALL_COLUMNS = (
    "workflow_id", "stage", "call_id", "model", "backend", "prompt_tokens", "completion_tokens", "queued_at",
    "dispatched_at", "first_token_at", "ended_at", "status", "error", "confidences", "pred_call_tokens",
    "pred_remaining_tokens", "policy", "kind", "prompt",
)
# Columns added after the first release: (name, SQL type); old trace files get them by ALTER TABLE on open.
_ADDED_COLUMNS = (("kind", "TEXT"), ("prompt", "TEXT"))
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS calls (
    workflow_id TEXT, stage INTEGER, call_id TEXT, model TEXT, backend TEXT, prompt_tokens INTEGER,
    completion_tokens INTEGER, queued_at REAL, dispatched_at REAL, first_token_at REAL, ended_at REAL,
    status TEXT, error TEXT, confidences TEXT, pred_call_tokens REAL, pred_remaining_tokens REAL, policy TEXT,
    kind TEXT, prompt TEXT
);
CREATE INDEX IF NOT EXISTS calls_wf ON calls(workflow_id);
CREATE TABLE IF NOT EXISTS feedback (workflow_id TEXT, score REAL, at REAL);
"""
_STOP = object()


class TraceStore:
    """Rows are queued and committed in batches by a background thread so request handlers never wait on disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._q: queue.Queue = queue.Queue()
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
        vals = dict(row)
        if isinstance(vals.get("confidences"), dict):
            vals["confidences"] = json.dumps(vals["confidences"])
        self._q.put(("calls", tuple(vals.get(c) for c in CALL_COLUMNS)))

    def log_feedback(self, workflow_id: str, score: float, at: float | None = None) -> None:
        self._q.put(("feedback", (workflow_id, float(score), time.time() if at is None else at)))

    def _writer(self) -> None:
        stop = False
        while not stop:
            items = [self._q.get()]
            while True:
                try:
                    items.append(self._q.get_nowait())
                except queue.Empty:
                    break
            calls, fb, waiters = [], [], []
            for it in items:
                if it is _STOP:
                    stop = True
                elif isinstance(it, threading.Event):
                    waiters.append(it)
                elif it[0] == "calls":
                    calls.append(it[1])
                else:
                    fb.append(it[1])
            with self._lock:
                if calls:
                    self._db.executemany(
                        f"INSERT INTO calls ({','.join(CALL_COLUMNS)}) VALUES ({','.join('?' * len(CALL_COLUMNS))})",
                        calls)
                if fb:
                    self._db.executemany("INSERT INTO feedback (workflow_id, score, at) VALUES (?,?,?)", fb)
                if calls or fb:
                    self._db.commit()
            for w in waiters:
                w.set()

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything queued so far is committed (tests, shutdown)."""
        ev = threading.Event()
        self._q.put(ev)
        ev.wait(timeout)

    def close(self) -> None:
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join(10)
        with self._lock:
            self._db.close()

    # ---- reads ---------------------------------------------------------------------------------------------
    def query(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        """Run a read query after flushing pending writes; rows as dicts (for tests and tooling)."""
        self.flush()
        with self._lock:
            cur = self._db.execute(sql, params)
            names = [d[0] for d in cur.description or ()]
            return [dict(zip(names, r)) for r in cur.fetchall()]
