"""The main job end to end (`python -m explore_jax.demo`) on a shortened budget: every artefact is
written, and every number in the report is finite and is the one in results.json and in the graded
responses it came from."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = ("baseline", "entropy_adv")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  root = tmp_path_factory.getbasetemp().parent  # shared with tests/test_train.py's runs
  workdir = tmp_path_factory.mktemp("demo")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop("XLA_FLAGS", None)
  # size=test: the trainer tests' model on two-number countdown, half its traces retrying.
  cmd = [sys.executable, "-m", "explore_jax.demo",
         "--config=configs/demo.py:seeds=2,steps=2,problems=5,size=test", f"--workdir={workdir}",
         f"--config.base_model_dir={root / 'explore_jax_cache' / 'base_models'}"]
  proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, proc.stdout


@pytest.mark.slow
def test_demo_writes_every_artefact_and_reports_the_graded_responses(demo):
  """One test, so the demo's fixture runs once (slow tests run first, so a worker may run another
  module between two of this one's tests and tear a module fixture down)."""
  workdir, stdout = demo
  for name in ("report.md", "report.html", "entropy_heatmap.html", "results.json"):
    assert os.path.getsize(workdir / name) > 200, name
  for name in ("pass_at_k.png", "training_curves.png"):
    with open(workdir / name, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
  # Progress through the four stages, and where the report is.
  for stage in ("1/4", "2/4", "3/4", "4/4"):
    assert f"] {stage} " in stdout, stage
  assert str(workdir / "report.md") in stdout
  for arm in ARMS:
    for seed in (0, 1):
      run = workdir / "runs" / f"{arm}_s{seed}"
      rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
      assert [r["step"] for r in rows] == [1, 2]
      assert all(math.isfinite(v) for r in rows for v in r.values())
      assert os.path.exists(run / "hf" / "model.safetensors")
  heat = open(workdir / "entropy_heatmap.html").read()
  assert heat.count("base #") == 2 and heat.count("baseline_s0 #") == 2
  check_report_numbers(demo)


def graded(workdir, label):
  """{problem_id: [correct, ...]} and the responses of one model's held-out evaluation."""
  recs = [json.loads(line) for line in
          open(workdir / "eval" / label / "heldout" / "responses.jsonl")]
  by_problem = {}
  for r in recs:
    by_problem.setdefault(r["problem_id"], []).append(bool(r["correct"]))
  return by_problem, recs


def check_report_numbers(demo):
  workdir, _ = demo
  results = json.load(open(workdir / "results.json"))
  summary = results["summary"]
  assert set(summary) == {"base", *ARMS}
  for arm, row in summary.items():
    ks = sorted(int(m.split("@")[1]) for m in row if m.startswith("pass@"))
    assert ks == [1, 2, 4, 8]
    assert all(math.isfinite(mean) and math.isfinite(ci) for mean, ci in row.values())
    assert all(0.0 <= row[f"pass@{k}"][0] <= 1.0 for k in ks)
    assert all(row[f"pass@{a}"][0] <= row[f"pass@{b}"][0] + 1e-12 for a, b in zip(ks, ks[1:]))
    np.testing.assert_allclose(row["pass@1"][0], row["avg@n"][0], atol=1e-12)
    if arm == "base":
      assert row["avg@n"][1] == 0.0  # one base model: no spread
      assert 0.0 < row["retries"][0] < 1.0
      assert 0.0 < row["avg@n"][0] < 1.0
  # avg@n of each model is the share of its graded responses marked correct, averaged per seed
  # (and the share of responses that check and retry).
  for arm in ARMS:
    per_seed = []
    for seed in (0, 1):
      _, recs = graded(workdir, f"{arm}_s{seed}")
      assert len(recs) == 5 * 8
      per_seed.append((np.mean([r["correct"] for r in recs]),
                       np.mean([", retry" in r["response"] for r in recs])))
    per_seed = np.array(per_seed)
    np.testing.assert_allclose(summary[arm]["avg@n"][0], per_seed[:, 0].mean(), atol=1e-9)
    np.testing.assert_allclose(summary[arm]["retries"][0], per_seed[:, 1].mean(), atol=1e-9)
    if per_seed[0, 0] != per_seed[1, 0]:
      assert summary[arm]["avg@n"][1] > 0  # two seeds that differ: a nonzero interval
  # The paired comparison, recomputed from the graded responses: pass@1 differences per seed and
  # the coverage counts (problems solved by one side's 8 samples and not the other's).
  comp = results["comparison"]["arms"]["entropy_adv"]
  diffs, arm_only, base_only = [], [], []
  for seed in (0, 1):
    arm, _ = graded(workdir, f"entropy_adv_s{seed}")
    base, _ = graded(workdir, f"baseline_s{seed}")
    assert set(arm) == set(base) and len(arm) == 5
    diffs.append(np.mean([np.mean(arm[p]) - np.mean(base[p]) for p in arm]))
    arm_only.append(sum(any(arm[p]) and not any(base[p]) for p in arm))
    base_only.append(sum(any(base[p]) and not any(arm[p]) for p in arm))
  np.testing.assert_allclose(comp["pass@1"]["per_seed"], diffs, atol=1e-9)
  np.testing.assert_allclose(comp["pass@1"]["diff"], np.mean(diffs), atol=1e-9)
  lo, hi = comp["pass@1"]["t_interval"]
  assert lo <= np.mean(diffs) <= hi and (hi - lo > 0) == (diffs[0] != diffs[1])
  assert comp["coverage"]["arm_only"] == arm_only and comp["coverage"]["baseline_only"] == base_only
  # The random-attempt floor: pass@k of uniformly random legal attempts, increasing in k.
  floor = results["random_attempt_floor"]
  assert 0.0 < floor["1"] < floor["8"] < 1.0
  # Every cell of the results table is results.json's figure, formatted as the report does (a
  # tolerance of one rounding step would fail on a figure that sits on a rounding boundary).
  from explore_jax.demo import study as demo_lib
  report = open(workdir / "report.md").read()
  section = report.split("## Held-out results", 1)[1].split("\n\n")[1]
  table = [line for line in section.splitlines() if line.startswith("| ")]
  header = [c.strip() for c in table[0].strip().strip("|").split("|")]
  assert header[:2] == ["model", "avg@n"]
  assert len(table) == 1 + len(summary)
  for line in table[1:]:
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    row = summary[cells[0]]
    for col, cell in zip(header[1:], cells[1:]):
      assert cell == demo_lib.format_cell(*row[col], seeds=2), (cells[0], col)
      mean, ci = (float(x) for x in re.fullmatch(r"(\S+) ± (\S+)", cell).groups())
      assert abs(mean - row[col][0]) <= 5e-4 + 1e-9 and abs(ci - row[col][1]) <= 5e-4 + 1e-9
  assert f"| entropy_adv | pass@1 | {comp['pass@1']['diff']:+.3f} |" in report
  assert f"{results['base_heldout_greedy_accuracy']:.3f}" in report
  # The paper's analyses ran on every shown model: fork tokens against the rest.
  for label in ("base", "baseline_s0", "entropy_adv_s0"):
    forks = results["analyses"][label]["forks"]
    assert forks["n_a"] > 0 and forks["n_b"] > 0 and math.isfinite(forks["mean_a"])
  # The HTML report renders the markdown: headings and tables, not their source.
  html_text = open(workdir / "report.html").read()
  assert html_text.count("<h2>") == 4 and html_text.count("<table>") == 4
  assert "# explore_jax" not in html_text and "|---" not in html_text
