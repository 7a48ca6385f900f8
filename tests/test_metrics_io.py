"""metrics: appended on a local disk, rotated part files in a bucket, one table read back; a resume
drops the rows it redoes; TensorBoard event files reach a gs:// workdir in small uploads."""

from __future__ import annotations

import json
import os
import struct

import pytest

from explore_jax.train import metrics as metrics_io


def _snapshot(store) -> dict[str, bytes]:
  return {k: bytes(v.getvalue()) for k, v in store.items()}


def _scalars(data: bytes) -> list[tuple]:
  """(tag, step, value) of every scalar in an event file; ("<start>", step, 0) for a restart."""
  from tensorboardX.proto import event_pb2
  out, pos = [], 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
    pos += 12 + length + 4  # length, its crc, the record, its crc
    if event.HasField("session_log"):
      out.append(("<start>", event.step, 0.0))
    out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
  return out


def _part(step: int) -> str:
  return f"/bucket/run/metrics/part-{step:08d}.jsonl"


def test_bucket_parts_tensorboard_and_resume(fake_bucket):
  workdir = "gs://bucket/run"
  log = metrics_io.MetricsLog(workdir, resume_step=0)
  written, biggest_tb, before = [], 0, _snapshot(fake_bucket)
  for step in range(1, 251):
    metrics = {"reward/mean": step / 1000, "perf/step_s": 1.5}
    log.write(step, metrics)
    written.append({"step": step, **metrics})
    after = _snapshot(fake_bucket)
    changed = {k for k in after if before.get(k) != after[k]}
    first = (step - 1) // 100 * 100 + 1
    # Each step rewrites its own part (at most 100 rows) and nothing else of the history.
    assert {k for k in changed if "/metrics" in k} == {_part(first)}, step
    assert after[_part(first)].count(b"\n") == step - first + 1
    tb = [k for k in changed if k.startswith("/bucket/run/tb/")]
    assert len(tb) == 1, (step, changed)
    biggest_tb = max(biggest_tb, len(after[tb[0]]))
    before = after
  log.close()
  assert metrics_io.read_metrics(workdir) == written
  assert metrics_io.read_metrics(workdir, up_to=7) == written[:7]
  assert sorted(k for k in fake_bucket if "/metrics" in k) == [_part(1), _part(101), _part(201)]
  events = sorted(k for k in fake_bucket if k.startswith("/bucket/run/tb/"))
  assert len(events) == 3  # a new event file every 100 steps
  scalars = [s for k in events for s in _scalars(bytes(fake_bucket[k].getvalue()))]
  assert [(step, v) for tag, step, v in scalars if tag == "reward/mean"] == [
      (s, pytest.approx(s / 1000)) for s in range(1, 251)]
  total = sum(len(fake_bucket[k].getvalue()) for k in events)
  assert biggest_tb < total / 2  # an upload holds at most one file's 100 steps, not the history

  # Resumed from the step-120 checkpoint: steps 121.. are redone, the old ones disappear.
  log = metrics_io.MetricsLog(workdir, resume_step=120)
  for step in range(121, 131):
    log.write(step, {"reward/mean": -step / 1000})
  log.close()
  redone = [{"step": s, "reward/mean": -s / 1000} for s in range(121, 131)]
  assert metrics_io.read_metrics(workdir) == written[:120] + redone
  assert sorted(k for k in fake_bucket if "/metrics" in k) == [_part(1), _part(101)]
  assert bytes(fake_bucket[_part(101)].getvalue()).count(b"\n") == 30
  # The event file of steps 201.. went; TensorBoard hides the old steps 121..200 of the file of
  # steps 101.. (a restart event, as tensorboardX's purge_step writes).
  events = sorted((k for k in fake_bucket if k.startswith("/bucket/run/tb/")),
                  key=lambda k: k[-8:])
  assert [k[-13:] for k in events] == [".step00000001", ".step00000101", ".step00000121"]
  assert _scalars(bytes(fake_bucket[events[-1]].getvalue()))[:2] == [
      ("<start>", 121, 0.0), ("reward/mean", 121, pytest.approx(-0.121))]


def test_local_append_and_old_workdirs(tmp_path, fake_bucket):
  # A local workdir keeps metrics.jsonl, appended to; a line cut by a kill is dropped on resume.
  workdir = tmp_path / "run"
  workdir.mkdir()
  path = workdir / "metrics.jsonl"
  old = [{"step": s, "reward/mean": float(s)} for s in range(1, 6)]
  path.write_text("".join(json.dumps(r) + "\n" for r in old) + '{"step": 6, "rew')
  log = metrics_io.MetricsLog(str(workdir), resume_step=3)
  inode = path.stat().st_ino
  log.write(4, {"reward/mean": 40.0})
  log.write(5, {"reward/mean": 50.0})
  assert path.stat().st_ino == inode  # appended to, never replaced
  log.close()
  expected = old[:3] + [{"step": 4, "reward/mean": 40.0}, {"step": 5, "reward/mean": 50.0}]
  assert [json.loads(line) for line in path.read_text().splitlines()] == expected
  assert metrics_io.read_metrics(str(workdir)) == expected
  assert metrics_io.read_metrics(str(path)) == expected
  assert any((workdir / "tb").iterdir())
  assert not (workdir / "metrics").exists()

  # A bucket workdir of the old layout (one whole metrics.jsonl) resumes into part files.
  from etils import epath
  legacy = epath.Path("gs://bucket/old/metrics.jsonl")
  legacy.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(1, 151)))
  log = metrics_io.MetricsLog("gs://bucket/old", resume_step=140)
  log.close()
  assert not legacy.exists()
  assert sorted(k for k in fake_bucket if k.startswith("/bucket/old/metrics")) == [
      "/bucket/old/metrics/part-00000001.jsonl", "/bucket/old/metrics/part-00000101.jsonl"]
  assert metrics_io.read_metrics("gs://bucket/old") == [{"step": s, "x": s}
                                                        for s in range(1, 141)]

  # Clear errors naming the path.
  with pytest.raises(FileNotFoundError, match="empty.*metrics.jsonl"):
    metrics_io.read_metrics(str(tmp_path / "empty"))
  bad = tmp_path / "bad" / "metrics" / "part-00000001.jsonl"
  bad.parent.mkdir(parents=True)
  bad.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
  with pytest.raises(ValueError, match=r"part-00000001.jsonl:2"):
    metrics_io.read_metrics(str(tmp_path / "bad"))
  os.remove(bad)
