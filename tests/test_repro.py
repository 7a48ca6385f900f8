"""`python -m explore_jax.demo.repro` (make demo-check): what it calls a difference."""

from explore_jax.demo import repro


def test_compare_results_names_each_differing_figure_but_not_timings():
  a = {"seconds": 100.0, "base_heldout_greedy_accuracy": 0.95,
       "summary": {"base": {"avg@n": [0.876, 0.0], "pass@4": [0.983, 0.0]}}}
  b = {"seconds": 99.0, "base_heldout_greedy_accuracy": 0.95,
       "summary": {"base": {"avg@n": [0.8760000001, 0.0], "pass@4": [0.983, 0.0]},
                   "baseline": {"avg@n": [0.9, 0.0]}}}
  assert repro.compare_results(a, a) == []
  assert repro.compare_results(a, b) == [
      "summary.base.avg@n[0]: 0.876 vs 0.8760000001",
      "summary.baseline.avg@n[0]: None vs 0.9", "summary.baseline.avg@n[1]: None vs 0.0"]


def test_compare_responses_byte_by_byte(tmp_path):
  for run, text in (("a", "x\n"), ("b", "x\n")):
    for model in ("base", "baseline_s0"):
      d = tmp_path / run / "eval" / model / "heldout"
      d.mkdir(parents=True)
      (d / "responses.jsonl").write_text(text if model == "base" else text + run)
  count, differ = repro.compare_responses(str(tmp_path / "a"), str(tmp_path / "b"))
  assert count == 2 and differ == ["eval/baseline_s0/heldout/responses.jsonl"]
