"""A run's metrics: written by process 0 at every step, read back as one table.

In WORKDIR (local or gs://):

  metrics.jsonl                    a local workdir: one JSON object per step (with `step`),
                                   appended to
  metrics/part-<first step>.jsonl  a bucket, where objects cannot be appended to: PART_ROWS rows a
                                   part; a step rewrites only the newest part, so it uploads at most
                                   PART_ROWS rows however long the run
  tb/                              TensorBoard event files; for a bucket written to a local temp dir
                                   and copied, a new file every TB_STEPS steps, for the same reason

`read_metrics` reads either layout (and both at once: an old bucket workdir, whose whole
metrics.jsonl was rewritten at each step, while it moves to part files) in step order. A run resumed
from the checkpoint of step s redoes the steps after s: `MetricsLog` drops their rows when it
starts, from whichever files hold them, and TensorBoard hides its events from s + 1 on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time

from etils import epath

from explore_jax import paths

LOCAL_FILE = "metrics.jsonl"
PARTS_DIR = "metrics"
PART_ROWS = 100
TB_STEPS = 100


def read_metrics(path: str, up_to: int | None = None) -> list[dict]:
  """The metrics of a workdir (local or gs://), or of one .jsonl file, in step order; with
  `up_to`, only the steps <= up_to. The last line of a file cut by a kill mid-write is ignored."""
  if epath.Path(path).name.endswith(".jsonl"):
    rows = _read_jsonl(epath.Path(path))
  else:
    sources = _sources(epath.Path(path))
    if not sources:
      raise FileNotFoundError(f"{path}: no {LOCAL_FILE} or {PARTS_DIR}/part-*.jsonl in it")
    rows = _merge(sources)
  return rows if up_to is None else [r for r in rows if r["step"] <= up_to]


class MetricsLog:
  """Writes WORKDIR's metrics (see the module docstring), when `enabled` (process 0 of a run).
  `resume_step`: the checkpoint the run starts from; rows of later steps are dropped."""

  def __init__(self, workdir: str, resume_step: int, enabled: bool = True,
               part_rows: int = PART_ROWS, tb_steps: int = TB_STEPS):
    self.enabled = enabled
    self.workdir = epath.Path(workdir)
    self.in_bucket = "://" in workdir
    self.part_rows = part_rows
    self.part: list[dict] = []  # in a bucket: the rows of the newest part
    self.tb = None
    if not enabled:
      return
    sources = _sources(self.workdir)
    rows = [r for r in _merge(sources) if r["step"] <= resume_step]
    if self.in_bucket:
      self._start_parts(sources, rows)
    else:
      if sources:  # once per start: the steps to redo and a line cut by a kill go
        paths.write_whole(self.workdir / LOCAL_FILE, _lines(rows))
        for path, _ in sources:
          if path.parent.name == PARTS_DIR:  # a bucket workdir copied to a local disk
            path.unlink()
    self.tb = _EventFiles(self.workdir / "tb", resume_step + 1, tb_steps)

  def _start_parts(self, sources: list, rows: list[dict]) -> None:
    chunks = [rows[i:i + self.part_rows] for i in range(0, len(rows), self.part_rows)]
    want = {_part_name(chunk[0]["step"]): chunk for chunk in chunks}
    have = {path.name: part for path, part in sources if path.parent.name == PARTS_DIR}
    parts = self.workdir / PARTS_DIR
    # The newest first, so that a start cut short leaves a prefix of the table (the next start
    # finishes the job).
    for name in sorted(set(have) - set(want), reverse=True):
      (parts / name).unlink()
    for name, chunk in want.items():
      if have.get(name) != chunk:
        (parts / name).write_text(_lines(chunk))
    (self.workdir / LOCAL_FILE).unlink(missing_ok=True)  # the old layout, now in parts
    self.part = list(chunks[-1]) if chunks and len(chunks[-1]) < self.part_rows else []

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": step, **metrics}
    if self.in_bucket:
      if len(self.part) == self.part_rows:
        self.part = []
      self.part.append(row)
      # An object is uploaded whole or not at all: a reader never sees half a part.
      (self.workdir / PARTS_DIR / _part_name(self.part[0]["step"])).write_text(
          _lines(self.part))
    else:
      with open(os.fspath(self.workdir / LOCAL_FILE), "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    self.tb.add(step, metrics)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
      self.tb = None


class _EventFiles:
  """TensorBoard event files in `dest`, written synchronously with tensorboardX's EventsWriter
  (its SummaryWriter writes from a thread: after a flush the file need not hold the step yet).

  For a bucket, tensorboardX's own gs:// writer would need google-cloud-storage credentials and
  upload the whole file at each flush; instead the events go to a local temp dir, the current file
  is copied to `dest` after each step, and a new file starts every `rotate_every` steps, so that a
  copy holds at most that many steps. `purge_step`: the first step of this start; the files of
  earlier starts that begin after it are deleted, and TensorBoard hides the rest of their events
  from there on."""

  def __init__(self, dest: epath.Path, purge_step: int, rotate_every: int | None):
    self.dest, self.purge_step, self.rotate_every = dest, purge_step, rotate_every
    self.in_bucket = "://" in os.fspath(dest)
    self.local = None if self.in_bucket else os.fspath(dest)  # in a bucket: one temp dir a file
    self.file, self.count = None, 0
    for path in dest.glob("events.out.tfevents.*") if dest.exists() else ():
      first = re.search(r"\.step(\d+)$", path.name)
      if first and int(first.group(1)) >= purge_step:  # holds only steps to be redone
        path.unlink()

  def add(self, step: int, metrics: dict) -> None:
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2, summary_pb2
    if self.file is None:
      if self.in_bucket:
        self.local = tempfile.mkdtemp(prefix="explore_jax_tb_")
      os.makedirs(self.local, exist_ok=True)
      self.file = EventsWriter(os.path.join(self.local, "events"), f".step{step:08d}")
      if self.purge_step is not None:
        self.file.write_event(event_pb2.Event(step=self.purge_step, session_log=(
            event_pb2.SessionLog(status=event_pb2.SessionLog.START))))
        self.purge_step = None
      self.count = 0
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()]
    self.file.write_event(event_pb2.Event(wall_time=time.time(), step=step,
                                          summary=summary_pb2.Summary(value=values)))
    self.file.flush()
    self.count += 1
    if self.in_bucket:
      self._copy()
      if self.count == self.rotate_every:  # complete: the next step starts another file
        self._close_file()

  def _copy(self) -> None:
    for name in os.listdir(self.local):
      with open(os.path.join(self.local, name), "rb") as f:
        (self.dest / name).write_bytes(f.read())

  def _close_file(self) -> None:
    self.file.close()
    if self.in_bucket:
      shutil.rmtree(self.local, ignore_errors=True)  # copied already
    self.file = None

  def close(self) -> None:
    if self.file is not None:
      self._close_file()


def _part_name(first_step: int) -> str:
  return f"part-{first_step:08d}.jsonl"


def _lines(rows: list[dict]) -> str:
  return "".join(json.dumps(r) + "\n" for r in rows)


def _sources(workdir: epath.Path) -> list[tuple[epath.Path, list[dict]]]:
  """(file, its rows) of every metrics file in `workdir`: metrics.jsonl first, then the parts in
  step order (a row in a later file replaces one of the same step)."""
  files = [workdir / LOCAL_FILE] if (workdir / LOCAL_FILE).exists() else []
  parts = workdir / PARTS_DIR
  if parts.exists():
    files += sorted(parts.glob("part-*.jsonl"), key=lambda p: int(p.name[5:-6]))
  return [(f, _read_jsonl(f)) for f in files]


def _merge(sources: list[tuple[epath.Path, list[dict]]]) -> list[dict]:
  by_step = {}
  for path, rows in sources:
    for row in rows:
      if not isinstance(row.get("step"), int):
        raise ValueError(f"{path}: a row without an integer step: {json.dumps(row)[:200]}")
      by_step[row["step"]] = row
  return [by_step[s] for s in sorted(by_step)]


def _read_jsonl(path: epath.Path) -> list[dict]:
  lines = path.read_text().splitlines()
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        break
      raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from None
  return rows
