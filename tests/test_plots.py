"""Plots write readable PNGs with the right panels; the entropy page escapes and colours tokens."""

from __future__ import annotations

import json
import re

import matplotlib.image
import numpy as np
import pytest

from explore_jax.evaluation import plots


def _image(path):
  img = matplotlib.image.imread(str(path))
  assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
  assert img[..., :3].std() > 0.01  # not a blank canvas
  return img


def test_pass_at_k_plot(tmp_path):
  curves = {"base": {"aime24": {1: 0.1, 2: 0.15, 4: 0.2, 256: 0.5}, "math500": {1: 0.6, 16: 0.8}},
            "rl": {"aime24": {1: 0.2, 2: 0.25, 4: 0.3, 256: 0.55}}}
  path = tmp_path / "passk.png"
  plots.plot_pass_at_k(curves, str(path))
  img = _image(path)
  assert img.shape[1] > img.shape[0]  # two panels side by side
  with pytest.raises(ValueError, match="no curves"):
    plots.plot_pass_at_k({}, str(path))


def test_read_metrics_and_training_curves(tmp_path):
  a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
  rows = [{"step": s, "reward/mean": -1 + s / 10, "actor/entropy": 1 / (s + 1),
           "actor/psi_over_abs_adv": 0.1, "perf/tokens_per_s": 5.0} for s in range(10)]
  a.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 10, "rew')  # killed
  b.write_text("".join(json.dumps({"step": s, "rollout/response_length_mean": 30 + s}) + "\n"
                       for s in range(5)))
  assert plots.read_metrics(str(a)) == rows
  present = plots.plot_training_curves({"grpo": str(a), "grpo+ent": str(b)},
                                       str(tmp_path / "c.png"))
  # Panels only for the keys some run logs, in the canonical order.
  assert present == ["reward/mean", "rollout/response_length_mean", "actor/entropy",
                     "actor/psi_over_abs_adv"]
  _image(tmp_path / "c.png")
  assert plots.plot_training_curves({"b": str(b)}, str(tmp_path / "d.png")) == [
      "rollout/response_length_mean"]
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"step": 0}\nnot json\n{"step": 1}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2"):
    plots.read_metrics(str(bad))
  with pytest.raises(ValueError, match="none of"):
    plots.plot_training_curves({"b": str(b)}, str(tmp_path / "e.png"),
                               keys={"critic/loss": "critic loss"})


def test_plots_cli(tmp_path, capsys):
  a = tmp_path / "run1" / "metrics.jsonl"
  a.parent.mkdir()
  a.write_text("".join(json.dumps({"step": s, "actor/entropy": 1.0 / (1 + s)}) + "\n"
                       for s in range(4)))
  plots.main(["--metrics", str(a), "--out", str(tmp_path / "curves.png")])
  _image(tmp_path / "curves.png")
  # A workdir as well: a bucket run's part files copied to a local disk.
  part = tmp_path / "run2" / "metrics" / "part-00000001.jsonl"
  part.parent.mkdir(parents=True)
  part.write_text("".join(json.dumps({"step": s, "reward/mean": s / 4}) + "\n" for s in range(4)))
  plots.main(["--metrics", str(a), str(tmp_path / "run2"), "--out", str(tmp_path / "two.png")])
  assert "(reward/mean, actor/entropy)" in capsys.readouterr().out
  _image(tmp_path / "two.png")


def test_comparison_bars(tmp_path):
  c = {"label_a": "pivotal", "label_b": "other", "mean_a": 1.2, "mean_b": 0.6, "sem_a": 0.05,
       "sem_b": 0.01, "p_welch": 1e-9, "cohens_d": 0.8}
  plots.plot_comparisons({"pivotal": c, "reflective": c}, str(tmp_path / "bars.png"))
  _image(tmp_path / "bars.png")


def test_entropy_html_escapes_and_colours():
  toks = ["<script>", "alert('x')", "</script>", " a & b", "\n", "<|im_end|>"]
  ents = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
  page = plots.entropy_html([(toks, ents)], titles=["<b>title</b>"], vmax=4.0)
  assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;/script&gt;" in page
  assert "&lt;|im_end|&gt;" in page and " a &amp; b" in page and "&lt;b&gt;title" in page
  assert "alert(&#x27;x&#x27;)" in page  # quotes escaped too (title attributes use ')
  spans = re.findall(r"<span style='background:rgb\((\d+),(\d+),(\d+)\)' title='H=([\d.]+)'>"
                     r"(.*?)</span>", page)
  assert len(spans) == len(toks) and spans[4][4] == "<br>"
  greens = [int(s[1]) for s in spans]
  assert greens[0] == 255 and greens == sorted(greens, reverse=True)  # redder with entropy
  assert greens[4] == greens[5]  # clipped at vmax
  assert [float(s[3]) for s in spans] == ents
  with pytest.raises(ValueError, match="2 tokens but 1"):
    plots.entropy_html([(["a", "b"], [1.0])])
  # Marked tokens (a task's forks) are underlined, the others not, and the legend says what.
  page = plots.entropy_html([(["7", " +", "\n", "3"], [1.0] * 4)], marks=[[True, False, False, True]],
                            mark_label="fork tokens")
  styles = re.findall(r"<span style='([^']*)'", page)
  assert ["underline" in st for st in styles] == [True, False, False, True]
  assert "Underlined: fork tokens." in page
  # Default scale: the 99th percentile, so one outlier does not wash out the rest.
  ents = np.r_[np.linspace(0, 1, 199), 100.0]
  page = plots.entropy_html([(["a"] * 200, ents)])
  # 0.995 sits on the rounding boundary of "0.99"/"1.00": compare as the page formats it.
  assert f"to {np.percentile(ents, 99):.2f} nats" in page and "to 100" not in page
