"""The length predictor refit in the background from the trace store's real per-stage lengths.

Every `refresh_s` one pass over the most recent `max_rows` successful calls of the trace store (a read-only SQLite
connection of its own, on a thread of its own: the trace writer keeps writing, the event loop never waits; the
grouping is SQLite's, which releases the GIL while it runs) sums completion tokens per (kind, stage, model). What
the result does depends on the configured length predictor:

- `running-mean` (no trained predictors) already learns each completion of this run in the admission core. Rows of
  earlier runs (another run id) warm it: each (kind, stage, model) cell counts as up to `warm_weight` completions of
  its mean beside the live ones, so a restarted gateway does not start from 256 tokens everywhere.
- a fixed predictor (the trained forest) is wrapped once (chimera.predict.calibrated.CalibratedLengths): its
  predictions × a ratio actual / predicted per (kind, stage, model), from this run's rows. The rows' logged
  predictions were already scaled by the ratio in force when they were made, so each refit divides that out (the
  ratios installed are kept with the wall time they took effect; rows are grouped by it in the same query) and fits
  on the raw predictions: no feedback of the calibration on itself. A cell's log-ratio is shrunk towards its
  model's by `shrink_rows` pseudo-rows, a model's towards 1, and both are kept within [1/max_ratio, max_ratio].

The new table is swapped in on the event loop (one reference, so a prediction on the prediction thread reads one
table or the next). A predictor replaced under it (a reload) is wrapped again, and calibration starts over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sqlite3
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from chimera.predict.calibrated import CalibratedLengths, CellKey, LengthRatios, cell_stage
from chimera.predict.priors import RunningLength
from chimera.sched.policy import Policy
from chimera.sched.predictors import OnlineLearner
from chimera.serve.live_config import LengthsConfig
from chimera.util.periodic import Periodic

log = logging.getLogger("chimera.serve.live")
MAX_EPOCHS = 128  # calibration tables remembered (rows predicted under an older one are not used)
_CHANGED = 0.005  # a new table is installed only when some ratio moves by more than this (relative)

_QUERY = """
WITH recent AS (
    SELECT kind, stage, model, completion_tokens AS tok, pred_call_tokens AS pred, queued_at AS t,
           COALESCE(substr(call_id, 1, :plen) = :prefix, 0) AS mine
    FROM calls
    WHERE status = 'ok' AND completion_tokens IS NOT NULL AND model IS NOT NULL AND kind IS NOT NULL
          AND stage IS NOT NULL
    ORDER BY rowid DESC LIMIT :max_rows)
SELECT kind, stage, model, mine, {epoch} AS epoch, COUNT(*), SUM(tok),
       SUM(pred > 0), SUM(CASE WHEN pred > 0 THEN tok END), SUM(CASE WHEN pred > 0 THEN pred END)
FROM recent GROUP BY kind, stage, model, mine, epoch
"""


@dataclass
class CellSums:
    """Sums over a cell's rows: all of them, and those with a prediction (actual and predicted tokens)."""

    n: int = 0
    tokens: float = 0.0
    n_pred: int = 0
    tokens_pred: float = 0.0
    pred: float = 0.0


@dataclass
class LengthRead:
    """One pass over the trace store: earlier runs' cells (for a running mean), this run's cells with their raw
    predictions (for calibration), this run's logged means per model, and what the pass cost."""

    rows: int = 0
    earlier: dict[CellKey, CellSums] = field(default_factory=dict)
    calibration: dict[CellKey, CellSums] = field(default_factory=dict)
    per_model: dict[str, CellSums] = field(default_factory=dict)
    seconds: float = 0.0


def _epoch_sql(n_epochs: int) -> tuple[str, list[str]]:
    """A CASE that numbers each of this run's rows by the calibration table in force when it was queued (−1: before
    the oldest one remembered, or another run's row); newest first, where most rows are."""
    if n_epochs == 0:
        return "-1", []
    whens = " ".join(f"WHEN t >= :e{k} THEN {k}" for k in range(n_epochs - 1, -1, -1))
    return f"CASE WHEN mine = 0 OR t IS NULL THEN -1 {whens} ELSE -1 END", [f"e{k}" for k in range(n_epochs)]


def read_lengths(db: sqlite3.Connection, run_prefix: str, max_rows: int,
                 epochs: Sequence[tuple[float, LengthRatios]]) -> LengthRead:
    """Read and group the recent rows (see the module doc); `epochs` are (wall time it took effect, the table)."""
    t0 = time.perf_counter()
    case, names = _epoch_sql(len(epochs))
    params: dict[str, object] = {"plen": len(run_prefix), "prefix": run_prefix, "max_rows": max_rows}
    params.update({name: start for name, (start, _) in zip(names, epochs)})
    out = LengthRead()
    for kind, stage, model, mine, epoch, n, tok, n_pred, tok_pred, pred in db.execute(_QUERY.format(epoch=case),
                                                                                       params):
        out.rows += n
        key = (str(kind), cell_stage(stage), str(model))
        if not mine:
            c = out.earlier.setdefault(key, CellSums())
            c.n, c.tokens = c.n + n, c.tokens + (tok or 0.0)
            continue
        if not n_pred:
            continue
        m = out.per_model.setdefault(key[2], CellSums())
        m.n_pred, m.tokens_pred, m.pred = m.n_pred + n_pred, m.tokens_pred + tok_pred, m.pred + pred
        if epoch < 0:
            continue
        ratio = epochs[epoch][1].ratio(key[0], key[1], key[2])
        c = out.calibration.setdefault(key, CellSums())
        c.n_pred, c.tokens_pred, c.pred = c.n_pred + n_pred, c.tokens_pred + tok_pred, c.pred + pred / ratio
    out.seconds = time.perf_counter() - t0
    return out


def warm_table(earlier: Mapping[CellKey, CellSums], weight: float,
               max_cells: int | None = None) -> dict[CellKey, tuple[float, float]]:
    """Earlier runs' cells as (tokens sum, weight) pseudo-observations: each cell's mean, counted at most `weight`
    times; the `max_cells` most populated cells."""
    out = {}
    for key, c in sorted(earlier.items(), key=lambda kv: -kv[1].n)[:max_cells]:
        if c.n > 0 and weight > 0:
            w = min(float(c.n), weight)
            out[key] = (c.tokens / c.n * w, w)
    return out


def fit_ratios(models: Sequence[str], calibration: Mapping[CellKey, CellSums], shrink: float, max_ratio: float,
               max_cells: int) -> LengthRatios:
    """Shrunk, bounded ratios actual / raw predicted per cell and per model (see the module doc)."""
    bound = math.log(max_ratio)

    def clip(x: float) -> float:
        return max(-bound, min(bound, x))

    totals: dict[str, CellSums] = defaultdict(CellSums)
    for (_, _, model), c in calibration.items():
        t = totals[model]
        t.n_pred, t.tokens_pred, t.pred = t.n_pred + c.n_pred, t.tokens_pred + c.tokens_pred, t.pred + c.pred
    log_model = {}
    for model, t in totals.items():
        if t.pred > 0 and t.tokens_pred > 0:
            log_model[model] = clip(t.n_pred / (t.n_pred + shrink) * math.log(t.tokens_pred / t.pred))
    cells = {}
    ranked = sorted(calibration.items(), key=lambda kv: -kv[1].n_pred)[:max_cells]
    for key, c in ranked:
        if c.pred <= 0 or c.tokens_pred <= 0 or key[2] not in log_model:
            continue
        w = c.n_pred / (c.n_pred + shrink)
        cells[key] = math.exp(clip(w * math.log(c.tokens_pred / c.pred) + (1.0 - w) * log_model[key[2]]))
    return LengthRatios(models, cells, {m: math.exp(v) for m, v in log_model.items()})


def _moved(old: LengthRatios, new: LengthRatios) -> bool:
    keys = set(old.cells) | set(new.cells)
    pairs = [(old.ratio(*k), new.ratio(*k)) for k in keys]
    pairs += [(old.per_model.get(m, 1.0), new.per_model.get(m, 1.0)) for m in set(old.per_model) | set(new.per_model)]
    return any(abs(a - b) > _CHANGED * max(a, b) for a, b in pairs)


def connect_read_only(path: str | Path) -> sqlite3.Connection:
    """A read-only connection to a trace store that another connection writes (WAL)."""
    return sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)


class LiveLengths:
    """Owns the refits: installs the calibration wrapper (a fixed predictor) or warms the running mean, runs the
    background loop, swaps results in on the event loop, and keeps what /metrics shows."""

    def __init__(self, cfg: LengthsConfig, policy: Policy, trace_path: str, run_id: str,
                 wall_now: Callable[[], float]) -> None:
        self.cfg, self.policy, self.trace_path = cfg, policy, trace_path
        self.prefix = f"{run_id}-"  # call ids are `<run>-<n>` (serve/records.py)
        self.wall_now = wall_now
        self.refits = 0
        self.failures = 0
        self.last: LengthRead | None = None
        self.last_at: float | None = None  # time.monotonic() of the last refit applied
        self.epochs: list[tuple[float, LengthRatios]] = []
        self.wrapper: CalibratedLengths | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="chimera-lengths")
        self._db: sqlite3.Connection | None = None
        self._db_lock = threading.Lock()
        self._loop = Periodic(self.refit, cfg.refresh_s, "length refit", first_after_s=0.0, logger=log)
        self._stopping = False

    @property
    def mode(self) -> str:
        """`warm` (a running mean), `calibrate` (a fixed predictor), or `none` (no length predictor, or one that
        learns online in a way this cannot correct)."""
        length = self.policy.length
        if isinstance(length, RunningLength):
            return "warm"
        if length is None or isinstance(length, OnlineLearner):
            return "none"
        return "calibrate"

    def _wrap(self) -> None:
        """Wrap the policy's fixed predictor (again, after it was replaced) and start calibration over."""
        if self.mode != "calibrate" or self.policy.length is self.wrapper:
            return
        self.wrapper = CalibratedLengths(self.policy.length)
        self.policy.use_length(self.wrapper)
        self.epochs = [(self.wall_now(), self.wrapper.ratios)]

    # ---- the loop --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._wrap()
        self._loop.start()

    async def stop(self) -> None:
        """Stop the loop, interrupt a pass in progress, and join the thread."""
        self._stopping = True
        await self._loop.stop()
        with self._db_lock:
            if self._db is not None:
                self._db.interrupt()
        with contextlib.suppress(RuntimeError):  # the pool was shut down already (a second stop)
            await asyncio.get_running_loop().run_in_executor(self._pool, self._close)
        await asyncio.to_thread(self._pool.shutdown, True)

    async def refit(self) -> bool:
        """One pass in the thread, applied here; False (counted, logged) when it failed."""
        epochs = list(self.epochs)
        try:
            read = await asyncio.get_running_loop().run_in_executor(self._pool, self._read, epochs)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not self._stopping:
                self.failures += 1
                log.warning("length refit from %s failed: %s: %s", self.trace_path, type(e).__name__, e)
            return False
        self._apply(read, epochs)
        return True

    def _read(self, epochs: Sequence[tuple[float, LengthRatios]]) -> LengthRead:
        with self._db_lock:
            if self._stopping:
                raise RuntimeError("stopping")
            if self._db is None:
                self._db = connect_read_only(self.trace_path)
            db = self._db
        try:
            return read_lengths(db, self.prefix, self.cfg.max_rows, epochs)
        except sqlite3.Error:
            with self._db_lock:  # a broken connection is opened afresh next time
                self._db = None
            with contextlib.suppress(sqlite3.Error):
                db.close()
            raise

    def _apply(self, read: LengthRead, epochs: Sequence[tuple[float, LengthRatios]]) -> None:
        """On the event loop: the new table into the predictor."""
        self.refits += 1
        self.last, self.last_at = read, time.monotonic()
        length = self.policy.length
        if isinstance(length, RunningLength):
            length.warm(warm_table(read.earlier, self.cfg.warm_weight, self.cfg.max_cells))
            return
        if length is not self.wrapper:  # replaced since the pass began: wrap the new one, calibrate afresh
            self._wrap()
            return
        if self.wrapper is None or epochs != self.epochs:
            return
        ratios = fit_ratios(self.wrapper.models_, read.calibration, self.cfg.shrink_rows, self.cfg.max_ratio,
                            self.cfg.max_cells)
        if _moved(self.wrapper.ratios, ratios):
            self.wrapper.ratios = ratios
            self.epochs = (self.epochs + [(self.wall_now(), ratios)])[-MAX_EPOCHS:]

    def _close(self) -> None:
        """On the refit thread, after the last pass: close the read connection."""
        with self._db_lock:
            db, self._db = self._db, None
        if db is not None:
            db.close()
