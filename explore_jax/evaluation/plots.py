"""Pictures of evaluations and runs: pass@k curves, training curves, comparison bars, entropy HTML.

Every function takes plain Python data (dicts of numbers, lists of strings) and writes one file, so
it can be pointed at results produced anywhere. matplotlib runs on the Agg backend (no display).

  python -m explore_jax.plots --metrics runs/grpo gs://BUCKET/grpo_ent --labels grpo grpo+entropy \
      --out curves.png      # workdirs (or their metrics.jsonl files)
"""

from __future__ import annotations

import argparse
import html
import math
import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from explore_jax.train.metrics import read_metrics  # noqa: E402

# Training-curve panels: metric key -> axis title. Keys a run does not log are skipped.
TRAINING_KEYS = {
    "reward/mean": "reward",
    "rollout/response_length_mean": "response length (tokens)",
    "actor/entropy": "entropy",
    "actor/psi_over_abs_adv": "psi / |A|",
}
# The mechanism of the entropy term (issue 20): what the testbed's report plots per arm.
MECHANISM_KEYS = {
    **TRAINING_KEYS,
    "rollout/entropy_first_token": "entropy at the first token (a fork)",
    "actor/psi_clip_binds_pos": "share of tokens where psi's clip binds, A > 0",
    "actor/psi_clip_binds_neg": "share of tokens where psi's clip binds, A < 0",
    "rollout/retry_frac": "share of responses that check and retry",
}


def _save(fig, axes, used: int, path: str, dpi: int) -> None:
  """Blank the panels past the first `used`, write the figure to `path` and free it."""
  for ax in list(axes.flat)[used:]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)


def plot_pass_at_k(curves: Mapping[str, Mapping[str, Mapping[int, float]]], path: str) -> None:
  """curves[model][benchmark][k] = pass@k in [0, 1]: one panel per benchmark, a line per model."""
  benches = list(dict.fromkeys(b for per_model in curves.values() for b in per_model))
  if not benches:
    raise ValueError("plot_pass_at_k: no curves to plot")
  cols = min(len(benches), 3)
  rows = math.ceil(len(benches) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.6 * rows), squeeze=False)
  for ax, bench in zip(axes.flat, benches):
    all_ks, top = set(), 0.0
    for label, per_model in curves.items():
      if bench in per_model:
        ks = sorted(per_model[bench])
        ys = [100 * per_model[bench][k] for k in ks]
        ax.plot(ks, ys, marker="o", ms=3, label=label)
        all_ks.update(ks)
        top = max(top, *ys)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(all_ks), [str(k) for k in sorted(all_ks)], fontsize=7)
    ax.minorticks_off()
    ax.set_ylim(0, min(100, top * 1.08) if top > 0 else 5)
    ax.set_title(bench)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  _save(fig, axes, len(benches), path, dpi=120)


def plot_training_curves(runs: Mapping[str, str], path: str,
                         keys: Mapping[str, str] = TRAINING_KEYS) -> list[str]:
  """Overlay runs ({label: workdir or metrics.jsonl}, as `read_metrics` takes them); one panel per
  key that any run logs; returns the keys.

  The x-axis is the row's `step` when logged, else its line index.
  """
  data = {label: read_metrics(p) for label, p in runs.items()}
  present = [k for k in keys if any(k in row for rows in data.values() for row in rows)]
  if not present:
    raise ValueError(f"plot_training_curves: none of {list(keys)} in {list(runs.values())}")
  fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.4), squeeze=False)
  for ax, key in zip(axes[0], present):
    for label, rows in data.items():
      pts = [(row.get("step", i), row[key]) for i, row in enumerate(rows)
             if isinstance(row.get(key), (int, float))]
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=label, lw=1.2)
    ax.set_title(keys[key])
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return present


def plot_arm_curves(arms: Mapping[str, Sequence[str]], path: str,
                    keys: Mapping[str, str] = MECHANISM_KEYS, columns: int = 4) -> list[str]:
  """Per arm ({arm: its runs' workdirs, one per seed}), each key's mean over seeds by step, with
  a band from the lowest to the highest seed; one panel per key that any run logs."""
  data = {arm: [read_metrics(d) for d in dirs] for arm, dirs in arms.items()}
  present = [k for k in keys if any(k in row for runs in data.values() for rows in runs
                                    for row in rows)]
  if not present:
    raise ValueError(f"plot_arm_curves: none of {list(keys)} in the runs of {list(arms)}")
  rows_n = -(-len(present) // columns)
  fig, axes = plt.subplots(rows_n, min(columns, len(present)), squeeze=False,
                           figsize=(4.2 * min(columns, len(present)), 3.3 * rows_n))
  for ax, key in zip(axes.flat, present):
    for arm, runs in data.items():
      by_step: dict[int, list[float]] = {}
      for rows in runs:
        for i, row in enumerate(rows):
          if isinstance(row.get(key), (int, float)):
            by_step.setdefault(int(row.get("step", i)), []).append(float(row[key]))
      if by_step:
        steps = sorted(by_step)
        vals = [np.asarray(by_step[t]) for t in steps]
        line, = ax.plot(steps, [v.mean() for v in vals], label=arm, lw=1.2)
        if max(len(v) for v in vals) > 1:
          ax.fill_between(steps, [v.min() for v in vals], [v.max() for v in vals],
                          color=line.get_color(), alpha=0.15)
    ax.set_title(keys[key], fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  _save(fig, axes, len(present), path, dpi=110)
  return present


def plot_comparisons(comparisons: Mapping[str, Mapping], path: str) -> None:
  """Bar pairs of mean entropy (with standard errors) for each analysis of explore_jax.evaluation.analyze.

  comparisons[name] holds `label_a`, `label_b`, `mean_a`, `mean_b`, `sem_a`, `sem_b`, `p_welch`.
  """
  names = list(comparisons)
  fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.4), squeeze=False)
  for ax, name in zip(axes[0], names):
    c = comparisons[name]
    ax.bar([0, 1], [c["mean_a"], c["mean_b"]], yerr=[c["sem_a"], c["sem_b"]], capsize=4,
           color=["#d6604d", "#92c5de"])
    ax.set_xticks([0, 1], [c["label_a"], c["label_b"]], fontsize=8)
    ax.set_title(f"{name}\np={c['p_welch']:.2g}, d={c['cohens_d']:.2f}", fontsize=9)
    ax.set_ylabel("mean entropy (nats)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _colour(value: float, vmax: float) -> str:
  """White (0) to red (>= vmax), as the token backgrounds of the paper's Figure 2."""
  x = min(max(value / vmax, 0.0), 1.0) if vmax > 0 else 0.0
  return f"rgb(255,{round(255 * (1 - 0.75 * x))},{round(255 * (1 - 0.85 * x))})"


def entropy_html(responses: Sequence[tuple[Sequence[str], Sequence[float]]],
                 titles: Sequence[str] | None = None, vmax: float | None = None,
                 title: str = "Token entropy", marks: Sequence[Sequence[bool]] | None = None,
                 mark_label: str = "") -> str:
  """An HTML page colouring every token (decoded string) by its entropy; hover shows the value.

  `marks` (one boolean per token of each response) underlines tokens, e.g. a task's fork tokens;
  `mark_label` says in the legend what they are.

  `vmax` (the entropy of full red) defaults to the 99th percentile of all entropies shown, so one
  outlier does not wash out the rest. Token text is HTML-escaped; newlines become line breaks.
  """
  all_h = np.concatenate([np.asarray(h, np.float64) for _, h in responses]) if responses else []
  if vmax is None:
    vmax = float(np.percentile(all_h, 99)) if len(all_h) else 1.0
  parts = [
      "<!DOCTYPE html><html><head><meta charset='utf-8'>",
      f"<title>{html.escape(title)}</title><style>",
      "body{font-family:sans-serif;max-width:60em;margin:2em auto}",
      ".r{font-family:monospace;white-space:pre-wrap;line-height:1.7;border:1px solid #ccc;"
      "padding:.8em;margin-bottom:1.5em}",
      "</style></head><body>",
      f"<h1>{html.escape(title)}</h1>",
      f"<p>Background: entropy from 0 (white) to {vmax:.2f} nats or more (red)."
      + (f" Underlined: {html.escape(mark_label)}." if marks is not None else "") + "</p>",
  ]
  for i, (toks, ents) in enumerate(responses):
    if len(toks) != len(ents):
      raise ValueError(f"entropy_html: response {i} has {len(toks)} tokens but {len(ents)} "
                       "entropies")
    head = titles[i] if titles is not None else f"response {i}"
    parts.append(f"<h3>{html.escape(head)}</h3><div class='r'>")
    marked = marks[i] if marks is not None else [False] * len(toks)
    for tok, h, m in zip(toks, ents, marked):
      text = html.escape(tok).replace("\n", "<br>")
      under = ";text-decoration:underline 2px" if m else ""
      parts.append(f"<span style='background:{_colour(float(h), vmax)}{under}' "
                   f"title='H={float(h):.3f}'>{text}</span>")
    parts.append("</div>")
  parts.append("</body></html>")
  return "".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Overlay the training curves of runs.")
  parser.add_argument("--metrics", nargs="+", required=True,
                      help="each run's workdir (local or gs://) or metrics.jsonl file")
  parser.add_argument("--labels", nargs="*",
                      help="one label per run (default: the workdir's name)")
  parser.add_argument("--out", required=True, help="output PNG")
  args = parser.parse_args(argv)
  labels = args.labels or [_run_name(p) for p in args.metrics]
  if len(labels) != len(args.metrics):
    parser.error(f"{len(labels)} labels for {len(args.metrics)} metrics files")
  labels = [lab if labels.index(lab) == i else f"{lab}_{i}" for i, lab in enumerate(labels)]
  present = plot_training_curves(dict(zip(labels, args.metrics)), args.out)
  print(f"wrote {args.out} ({', '.join(present)})")


def _run_name(path: str) -> str:
  """A run's default label: the name of its workdir (given the workdir or its metrics.jsonl)."""
  path = (path if "://" in path else os.path.abspath(path)).rstrip("/")
  if path.endswith(".jsonl"):
    path = path.rsplit("/", 1)[0]
  return path.rsplit("/", 1)[-1]
