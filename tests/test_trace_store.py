"""TraceStore against hostile rows: sanitising, a writer thread that never dies, a bounded backlog, stats()."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

import pytest

from chimera.serve.trace import TraceStore


def _row(i: int, **kw) -> dict:
    return {"workflow_id": f"wf-{i}", "stage": 0, "call_id": f"c-{i}", "model": "m", "status": "ok",
            "prompt_tokens": 10, "completion_tokens": 5, "queued_at": 1.0, "ended_at": 2.0, **kw}


def _calls(store: TraceStore) -> list[dict]:
    return store.query("SELECT * FROM calls ORDER BY rowid")


@pytest.fixture
def store(tmp_path):
    s = TraceStore(tmp_path / "t.sqlite")
    yield s
    s.close()


def test_lone_surrogates_are_stored_escaped_and_the_writer_survives(store):
    store.log_call(_row(0, kind="\ud800", workflow_id="wf-\udfff", prompt="hi \ud83d there", error="\udc80"))
    store.log_feedback("wf-\udfff", 0.5, at=3.0)
    assert store.flush()
    assert store.stats()["alive"]
    store.log_call(_row(1, kind="chat"))
    rows = _calls(store)
    assert [(r["workflow_id"], r["kind"], r["prompt"], r["error"]) for r in rows] == [
        ("wf-\\udfff", "\\ud800", "hi \\ud83d there", "\\udc80"), ("wf-1", "chat", None, None)]
    assert store.query("SELECT * FROM feedback") == [{"workflow_id": "wf-\\udfff", "score": 0.5, "at": 3.0}]
    assert store.stats() == {"alive": True, "backlog": 0, "written": 3, "dropped": 0, "errors": 0}


def test_out_of_int64_values_do_not_kill_the_writer(store):
    big = 99999999999999999999
    store.log_call(_row(0, stage=big, prompt_tokens=-(2 ** 63) - 1, completion_tokens=2 ** 63 - 1,
                        call_id=big, queued_at=10 ** 400))
    store.log_call(_row(1, stage=1))
    rows = _calls(store)
    assert store.stats()["alive"] and len(rows) == 2
    r0 = rows[0]
    assert r0["stage"] is None and r0["prompt_tokens"] is None and r0["queued_at"] is None
    assert r0["completion_tokens"] == 2 ** 63 - 1  # the int64 edge is kept
    assert r0["call_id"] == str(big)  # TEXT column: the digits
    assert rows[1]["stage"] == 1
    assert store.stats()["dropped"] == 0


def test_nan_and_inf_become_null(store):
    store.log_call(_row(0, confidences={"big": float("nan"), "small": 0.5}, pred_call_tokens=float("nan"),
                        pred_remaining_tokens=float("inf"), first_token_at=float("-inf")))
    store.log_call(_row(1, confidences={"big": 0.8}, pred_call_tokens=12.5))
    store.log_feedback("wf-0", float("nan"), at=float("inf"))
    store.log_feedback("wf-1", "not a number")
    store.log_feedback("wf-1", 1, at=5)
    r0, r1 = _calls(store)
    assert r0["confidences"] is None and r0["pred_call_tokens"] is None
    assert r0["pred_remaining_tokens"] is None and r0["first_token_at"] is None
    assert r1["confidences"] == '{"big": 0.8}' and r1["pred_call_tokens"] == 12.5
    fb = store.query("SELECT * FROM feedback ORDER BY rowid")
    assert fb[0] == {"workflow_id": "wf-0", "score": None, "at": None}
    assert fb[1]["score"] is None and fb[1]["at"] is not None
    assert fb[2] == {"workflow_id": "wf-1", "score": 1.0, "at": 5}
    assert store.stats() == {"alive": True, "backlog": 0, "written": 5, "dropped": 0, "errors": 0}


def test_unexpected_values_become_short_strings(store):
    class Odd:
        def __str__(self) -> str:
            return "odd\ud800" + "x" * 5000

    class Broken:
        def __str__(self) -> str:
            raise RuntimeError("no")

    circular: dict = {}
    circular["me"] = circular
    store.log_call(_row(0, model=Odd(), backend=Broken(), policy=["a", 1], confidences=circular,
                        error={"k": object()}))
    [r] = _calls(store)
    assert r["model"].startswith("odd\\ud800x") and len(r["model"]) < 1100
    assert r["backend"] is None and r["policy"] == "['a', 1]"
    assert r["confidences"] is None and r["error"] is None
    assert store.stats()["written"] == 1


def test_full_backlog_drops_instead_of_blocking_and_flush_close_still_return(tmp_path):
    store = TraceStore(tmp_path / "t.sqlite", max_backlog=3)
    with store._lock:  # the writer cannot commit: the backlog fills up
        t0 = time.perf_counter()
        for i in range(50):
            store.log_call(_row(i))
        store.log_feedback("wf-0", 1.0)
        assert time.perf_counter() - t0 < 0.5  # never waited on the writer
        assert store.stats() == {"alive": True, "backlog": 3, "written": 0, "dropped": 48, "errors": 0}
        assert store.flush(timeout=0.05) is False  # the flush marker gets in although the backlog is full
        closer = threading.Thread(target=store.close)
        closer.start()  # so does the stop marker
        time.sleep(0.05)
        assert closer.is_alive()  # waiting for the writer, which waits for us
    closer.join(5)
    assert not closer.is_alive()
    assert store.stats() == {"alive": False, "backlog": 0, "written": 3, "dropped": 48, "errors": 0}
    store.log_call(_row(99))  # after close: dropped, not queued forever
    assert store.stats()["dropped"] == 49 and store.stats()["backlog"] == 0
    assert store.flush(timeout=1) is True  # returns at once on a closed store
    db = sqlite3.connect(tmp_path / "t.sqlite")
    assert [r[0] for r in db.execute("SELECT call_id FROM calls ORDER BY rowid")] == ["c-0", "c-1", "c-2"]
    db.close()


def test_backlog_frees_up_once_the_writer_catches_up(tmp_path):
    store = TraceStore(tmp_path / "t.sqlite", max_backlog=2)
    try:
        with store._lock:
            for i in range(4):
                store.log_call(_row(i))
        assert store.flush()
        for i in range(4, 6):
            store.log_call(_row(i))
        assert store.flush()
        assert store.stats() == {"alive": True, "backlog": 0, "written": 4, "dropped": 2, "errors": 0}
        assert [r["call_id"] for r in _calls(store)] == ["c-0", "c-1", "c-4", "c-5"]
    finally:
        store.close()
    with pytest.raises(ValueError, match="max_backlog"):
        TraceStore(tmp_path / "u.sqlite", max_backlog=0)


def test_stats_track_written_backlog_and_alive(store):
    assert store.stats() == {"alive": True, "backlog": 0, "written": 0, "dropped": 0, "errors": 0}
    with store._lock:
        for i in range(5):
            store.log_call(_row(i))
        store.log_feedback("wf-1", 0.7)
        assert store.stats()["backlog"] == 6 and store.stats()["written"] == 0
    assert store.flush()
    assert store.stats() == {"alive": True, "backlog": 0, "written": 6, "dropped": 0, "errors": 0}
    store.close()
    assert store.stats() == {"alive": False, "backlog": 0, "written": 6, "dropped": 0, "errors": 0}


def _poison(store: TraceStore) -> None:
    """A row that sanitising cannot save: a trigger refuses kind = 'poison'."""
    with store._lock:
        store._db.execute("CREATE TRIGGER poison BEFORE INSERT ON calls WHEN NEW.kind = 'poison' "
                          "BEGIN SELECT RAISE(ABORT, 'poisoned row'); END")
        store._db.commit()


def test_an_unstorable_row_is_dropped_and_the_rest_of_its_batch_stored(store, caplog):
    _poison(store)
    with caplog.at_level(logging.WARNING, logger="chimera.serve.trace"):
        with store._lock:  # rows 1..4 pile up and go in as one batch
            for i in range(5):
                store.log_call(_row(i, kind="poison" if i == 2 else "chat"))
        assert store.flush()
    assert [r["call_id"] for r in _calls(store)] == ["c-0", "c-1", "c-3", "c-4"]
    assert store.stats() == {"alive": True, "backlog": 0, "written": 4, "dropped": 1, "errors": 0}
    msgs = [r.getMessage() for r in caplog.records if r.name == "chimera.serve.trace"]
    assert len(msgs) == 1 and "poisoned row" in msgs[0] and "calls" in msgs[0]
    store.log_call(_row(5))
    assert len(_calls(store)) == 5


def test_failures_are_logged_at_most_once_a_second(store, caplog):
    _poison(store)
    with caplog.at_level(logging.WARNING, logger="chimera.serve.trace"):
        t0 = time.monotonic()
        for i in range(200):
            store.log_call(_row(i, kind="poison"))
        assert store.flush()
        elapsed = time.monotonic() - t0
    assert store.stats()["dropped"] == 200 and store.stats()["alive"]
    n = sum(1 for r in caplog.records if r.name == "chimera.serve.trace")
    assert 1 <= n <= 1 + int(elapsed)


def test_the_writer_survives_an_iteration_that_raises(store, monkeypatch, caplog):
    real = store._write
    calls = {"n": 0}

    def flaky(table, batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("disk on fire")
        real(table, batch)

    monkeypatch.setattr(store, "_write", flaky)
    with caplog.at_level(logging.WARNING, logger="chimera.serve.trace"):
        store.log_call(_row(0))
        assert store.flush()  # the flush marker of a failed iteration is still released
    assert store.stats() == {"alive": True, "backlog": 0, "written": 0, "dropped": 1, "errors": 1}
    assert any("disk on fire" in r.getMessage() for r in caplog.records)
    store.log_call(_row(1))
    assert [r["call_id"] for r in _calls(store)] == ["c-1"]
    assert store.stats() == {"alive": True, "backlog": 0, "written": 1, "dropped": 1, "errors": 1}

