"""Run logging: append-only ``metrics.jsonl`` plus TensorBoard scalars.

Layout of a run directory::

    RUN_DIR/metrics.jsonl      one JSON object per line, appended, flushed per record
    RUN_DIR/tensorboard/       SummaryWriter event files

Every record is a dict with an integer ``"step"`` and a string ``"kind"``
(``"train"``, ``"eval"``, ``"info"`` or any other string); the remaining keys are
values. :class:`RunLogger` adds ``"time"`` (Unix seconds) when the record has none.

Resume rule (see :func:`read_metrics`): the file is never rewritten. Each time a
logger is opened on a directory it appends a marker ``{"kind": "resume", "step": R}``
(``R = resume_step``; ``R = -1`` for a fresh start over an existing log). Records
written *before* a marker whose step is greater than ``R`` belong to work that is
being redone and are dropped when reading.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import time
from pathlib import Path
from typing import Any

from semifer.labels import ABAW_LABELS, NUM_CLASSES

__all__ = ["METRICS_FILE", "TB_DIR", "RESUME_KIND", "RunLogger", "read_metrics", "to_plain"]

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"
RESUME_KIND = "resume"
# Kinds that are events rather than per-step measurements: several may share a step,
# so read_metrics never de-duplicates them.
_EVENT_KINDS = frozenset({"info", RESUME_KIND})
# Keys that are bookkeeping, not values to chart.
_META_KEYS = frozenset({"step", "kind", "time"})

_log = logging.getLogger(__name__)


def to_plain(value: Any, *, nan_to_none: bool = True) -> Any:
    """Convert tensors, numpy values, tuples and paths to JSON-ready Python values.

    Non-finite floats become ``None`` when ``nan_to_none`` (JSON has no NaN/inf).
    Unknown objects fall back to ``str(value)`` so a stray object never kills a run.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):  # float, numpy floating
        f = float(value)
        return None if nan_to_none and not math.isfinite(f) else f
    if isinstance(value, dict):
        return {str(k): to_plain(v, nan_to_none=nan_to_none) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v, nan_to_none=nan_to_none) for v in value]
    if isinstance(value, Path):
        return str(value)
    # torch.Tensor / numpy.ndarray / numpy scalar: .tolist() yields Python scalars or
    # nested lists (0-d gives a scalar). Duck-typed so torch is not imported here.
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        if hasattr(value, "detach"):
            value = value.detach().cpu()
        return to_plain(tolist(), nan_to_none=nan_to_none)
    item = getattr(value, "item", None)
    if callable(item):
        return to_plain(item(), nan_to_none=nan_to_none)
    return str(value)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _scalars(kind: str, key: str, value: Any) -> list[tuple[str, float]]:
    """TensorBoard (tag, value) pairs for one plain record value; [] if not chartable."""
    tag = f"{kind}/{key}"
    if _is_number(value):
        return [(tag, float(value))]
    if isinstance(value, list) and len(value) == NUM_CLASSES and all(
        v is None or _is_number(v) for v in value
    ):
        # Per-class values (thresholds, class mix, per-class F1): one tag per class name.
        return [(f"{tag}/{ABAW_LABELS[i]}", float(v)) for i, v in enumerate(value) if v is not None]
    if isinstance(value, dict) and value and all(v is None or _is_number(v) for v in value.values()):
        return [(f"{tag}/{name}", float(v)) for name, v in value.items() if v is not None]
    return []  # strings, nested lists (confusion matrices), other-length lists: jsonl only


class RunLogger:
    """Append training records to ``RUN_DIR/metrics.jsonl`` and TensorBoard.

    ``enabled=False`` (non-zero DDP rank) makes every method a no-op and touches no
    file. ``resume_step=R`` marks that training restarts from a checkpoint taken at
    step R: records already logged with step > R are superseded (see
    :func:`read_metrics`) and TensorBoard purges its events with step > R.
    ``tensorboard=False`` writes only the jsonl file.
    """

    def __init__(
        self,
        run_dir: Path | str,
        *,
        enabled: bool = True,
        resume_step: int | None = None,
        tensorboard: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.resume_step = None if resume_step is None else int(resume_step)
        self._file = None
        self._tb = None
        self._closed = False
        if not enabled:
            return

        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        size = path.stat().st_size if path.exists() else 0
        needs_newline = False
        if size:
            with path.open("rb") as fh:
                fh.seek(-1, 2)
                # A killed run can leave a partial last line; start ours on a fresh line
                # so only that fragment, not our first record, is unreadable.
                needs_newline = fh.read(1) != b"\n"
        self._file = path.open("a", encoding="utf-8")
        if needs_newline:
            self._file.write("\n")

        # A fresh start over an existing log supersedes all of it (marker step -1);
        # nothing is deleted, so an accidental restart loses no history.
        marker_step = self.resume_step if self.resume_step is not None else (-1 if size else None)
        if marker_step is not None:
            self._write_line({"step": marker_step, "kind": RESUME_KIND, "time": time.time()})

        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import; only when used

            # TensorBoard purges events with step >= purge_step; records at step R itself
            # were done before the checkpoint and are not redone, hence R + 1.
            purge = None if marker_step is None else marker_step + 1
            self._tb = SummaryWriter(
                log_dir=str(self.run_dir / TB_DIR), purge_step=purge, flush_secs=30
            )

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE

    def _write_line(self, record: dict) -> None:
        # One write call per line plus flush: a killed process loses at most this line.
        self._file.write(json.dumps(record, allow_nan=False, ensure_ascii=False) + "\n")
        self._file.flush()

    def log(self, record: dict) -> None:
        """Log one record (needs ``"step"`` and ``"kind"``); the caller's dict is not modified."""
        if not self.enabled:
            return
        if self._closed:
            raise ValueError("RunLogger.log() called after close()")
        if "step" not in record or "kind" not in record:
            raise ValueError(f"record needs 'step' and 'kind' keys, got {sorted(record)}")
        kind = record["kind"]
        if not isinstance(kind, str):
            raise ValueError(f"record 'kind' must be a str, got {kind!r}")
        step = to_plain(record["step"])
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"record 'step' must be an int, got {record['step']!r}")

        plain = to_plain(record)  # NaN/inf -> None for JSON
        plain["step"] = step
        plain.setdefault("time", time.time())
        self._write_line(plain)

        if self._tb is not None:
            if kind == "info":
                text = json.dumps({k: v for k, v in plain.items() if k not in _META_KEYS},
                                  indent=1, ensure_ascii=False)
                self._tb.add_text("info", f"```\n{text}\n```", step)
                return
            # Keep NaN for TensorBoard (it can display it; JSON cannot).
            tb_values = to_plain(record, nan_to_none=False)
            for key, value in tb_values.items():
                if key in _META_KEYS:
                    continue
                for tag, v in _scalars(kind, key, value):
                    self._tb.add_scalar(tag, v, step)

    def flush(self) -> None:
        """Flush TensorBoard (the jsonl file is flushed on every record)."""
        if self._tb is not None and not self._closed:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close both outputs; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(run_dir: Path | str, *, include_markers: bool = False) -> list[dict]:
    """Read the valid records of a run, resolving resumes; sorted by step (stable).

    ``run_dir`` may also be the path of a ``metrics.jsonl`` file. Rules:

    * Unreadable lines (a killed run's truncated last line, or anything else that is
      not a JSON object with an int ``step`` and a str ``kind``) are skipped wherever
      they are; their count is reported with a logging warning.
    * A resume marker ``{"kind": "resume", "step": R}`` drops every record written
      before it with ``step > R`` (that work was redone after the resume).
    * For measurement kinds (all but ``"info"`` and ``"resume"``), only the last record
      per ``(kind, step)`` is kept, in case a resumed run re-logs its resume step.
    * Resume markers are returned only when ``include_markers``.

    Raises ``FileNotFoundError`` when there is no metrics file.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    records: list[dict] = []
    bad = 0
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if (
                not isinstance(rec, dict)
                or not isinstance(rec.get("step"), int)
                or isinstance(rec.get("step"), bool)
                or not isinstance(rec.get("kind"), str)
            ):
                bad += 1
                continue
            if rec["kind"] == RESUME_KIND:
                r = rec["step"]
                records = [x for x in records if x["step"] <= r]
            records.append(rec)
    if bad:
        _log.warning("%s: skipped %d unreadable line(s) (a killed run leaves a truncated "
                     "last line)", path, bad)

    # Last record wins per (kind, step) for measurements: walk backwards keeping firsts.
    seen: set[tuple[str, int]] = set()
    kept: list[dict] = []
    for rec in reversed(records):
        kind = rec["kind"]
        if kind == RESUME_KIND and not include_markers:
            continue
        if kind not in _EVENT_KINDS:
            key = (kind, rec["step"])
            if key in seen:
                continue
            seen.add(key)
        kept.append(rec)
    kept.reverse()
    kept.sort(key=lambda r: r["step"])  # stable: file order within a step
    return kept
