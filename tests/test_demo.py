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
VARIANTS = ("baseline", "entropy_adv", "entropy_reg")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  root = tmp_path_factory.getbasetemp().parent  # shared with tests/test_train.py's runs
  workdir = tmp_path_factory.mktemp("demo")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop("XLA_FLAGS", None)
  # size=test: the trainer tests' model and task; half the pre-training problems demonstrated by
  # the bare answer, so that the report's bare-answer column has something to count.
  cmd = [sys.executable, "-m", "explore_jax.demo",
         "--config=configs/demo.py:seeds=2,steps=2,problems=5,size=test", f"--workdir={workdir}",
         f"--config.base_model_dir={root / 'explore_jax_cache' / 'base_models'}",
         "--config.train.pretrain.direct_answer_frac=0.5"]
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
  for variant in VARIANTS:
    for seed in (0, 1):
      run = workdir / "runs" / f"{variant}_s{seed}"
      rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
      assert [r["step"] for r in rows] == [1, 2]
      assert all(math.isfinite(v) for r in rows for v in r.values())
      assert os.path.exists(run / "hf" / "model.safetensors")
  heat = open(workdir / "entropy_heatmap.html").read()
  assert heat.count("base #") == 2 and heat.count("baseline_s0 #") == 2
  check_report_numbers(demo)


def check_report_numbers(demo):
  workdir, _ = demo
  results = json.load(open(workdir / "results.json"))
  summary = results["summary"]
  assert set(summary) == {"base", *VARIANTS}
  for variant, row in summary.items():
    ks = sorted(int(m.split("@")[1]) for m in row if m.startswith("pass@"))
    assert ks == [1, 2, 4, 8]
    assert all(math.isfinite(mean) and math.isfinite(ci) for mean, ci in row.values())
    assert all(0.0 <= row[f"pass@{k}"][0] <= 1.0 for k in ks)
    assert all(row[f"pass@{a}"][0] <= row[f"pass@{b}"][0] + 1e-12 for a, b in zip(ks, ks[1:]))
    np.testing.assert_allclose(row["pass@1"][0], row["avg@n"][0], atol=1e-12)
    if variant == "base":
      assert row["avg@n"][1] == 0.0  # one base model: no spread
      assert 0.0 < row["bare_answers"][0] < 1.0
  # avg@n of each model is the share of its graded responses marked correct, averaged per seed.
  for variant in VARIANTS:  # (and the share of responses that are a bare boxed answer)
    per_seed = []
    for seed in (0, 1):
      recs = [json.loads(line) for line in
              open(workdir / "eval" / f"{variant}_s{seed}" / "heldout" / "responses.jsonl")]
      assert len(recs) == 5 * 8
      per_seed.append((np.mean([r["correct"] for r in recs]),
                       np.mean([r["response"].strip().startswith("\\boxed{") for r in recs])))
    per_seed = np.array(per_seed)
    np.testing.assert_allclose(summary[variant]["avg@n"][0], per_seed[:, 0].mean(), atol=1e-9)
    np.testing.assert_allclose(summary[variant]["bare_answers"][0], per_seed[:, 1].mean(),
                               atol=1e-9)
    per_seed = per_seed[:, 0]
    if per_seed[0] != per_seed[1]:
      assert summary[variant]["avg@n"][1] > 0  # two seeds that differ: a nonzero interval
  # Every cell of the report's table is results.json's figure, formatted as the report does (a
  # tolerance of one rounding step would fail on a figure that sits on a rounding boundary).
  from explore_jax import demo as demo_lib
  table = [line for line in open(workdir / "report.md") if line.startswith("| ")]
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
  assert f"{results['base_heldout_greedy_accuracy']:.3f}" in open(workdir / "report.md").read()
  # The HTML report's heading is a heading, not the markdown source.
  html_text = open(workdir / "report.html").read()
  assert "<h1>" in html_text and "# explore_jax" not in html_text
