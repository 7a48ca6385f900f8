r"""The main job: the paper's experiment at CPU scale, end to end, in one command.

    python -m explore_jax.demo --config configs/demo.py --workdir runs/demo

1. a tiny Qwen2 "base model" is pre-trained on arithmetic problems, most shown with worked
   solutions and a share `pretrain.direct_answer_frac` with the bare answer (cached in the
   workdir);
2. for each seed, GRPO (baseline), GRPO + entropy advantage and GRPO + entropy regularizer are
   trained from it with the same data order, budget and seed (`explore_jax.train`);
3. the base and every trained model are evaluated on the held-out split: avg@64 and pass@k for
   k = 1..64 (`explore_jax.evaluate`, the paper's sampling protocol);
4. `report.md` / `report.html` gather the numbers (means and 95% intervals over seeds), pass@k and
   training curves, and a token-entropy heatmap of a few responses; `results.json` has every figure.

Every stage resumes: a second run of the same command only redoes what is missing. An RL run
whose settings changed is refused, naming them; the evaluation of a model since retrained is
sampled again (the old responses are kept as responses.stale.jsonl).
"""

from __future__ import annotations

import csv
import html
import json
import logging
import os
import time

from absl import app, flags
import jax
import matplotlib
import ml_collections
from ml_collections import config_flags
import numpy as np
from scipy import stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from explore_jax import analyze, checkpoint, defaults, evaluate, plots, pretrain, provenance, train



def _say(msg: str) -> None:
  print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_name(variant: str, seed: int) -> str:
  return f"{variant}_s{seed}"


def variant_config(config: ml_collections.ConfigDict, variant: str, seed: int, base: str):
  c = ml_collections.ConfigDict(config.train.to_dict())
  defaults.apply_variant(c, variant)
  c.seed = seed
  c.model.path = base
  return c


def mean_ci(values) -> tuple[float, float]:
  """Mean and half-width of the 95% t-interval (0 for a single value)."""
  v = np.asarray(values, np.float64)
  if v.size < 2:
    return float(v.mean()), 0.0
  return float(v.mean()), float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))


def bare_answer_rate(responses_path: str, problem_ids: set[str]) -> float:
  """Share of graded responses to `problem_ids` that box an answer with no worked step before it."""
  with open(responses_path) as f:
    recs = [r for r in map(json.loads, filter(str.strip, f)) if str(r["problem_id"]) in problem_ids]
  if not recs:
    raise ValueError(f"{responses_path}: no responses to the evaluated problems")
  return float(np.mean([r["response"].lstrip().startswith("\\boxed") for r in recs]))


def summarize(results: dict, labels: dict[str, tuple[str, int]], eval_dir: str) -> dict:
  """{variant: {metric: (mean, ci)}} over seeds, from evaluate's results and responses."""
  with open(os.path.join(eval_dir, "per_problem.csv"), newline="") as f:
    evaluated: dict[str, set[str]] = {}
    for r in csv.DictReader(f):
      if r["benchmark"] == "heldout":
        evaluated.setdefault(r["model"], set()).add(r["problem_id"])
  by_variant: dict[str, dict[str, list[float]]] = {}
  for label, (variant, _) in labels.items():
    bench = results["models"][label]["benchmarks"]["heldout"]
    row = by_variant.setdefault(variant, {})
    row.setdefault("bare_answers", []).append(bare_answer_rate(
        os.path.join(eval_dir, label, "heldout", "responses.jsonl"), evaluated[label]))
    row.setdefault("avg@n", []).append(bench["avg@n"])
    for k, v in bench["pass@k"].items():
      row.setdefault(f"pass@{k}", []).append(v)
    row.setdefault("mean_length", []).append(bench["mean_length"])
    row.setdefault("repetition_rate", []).append(bench["repetition_rate"])
  return {variant: {m: mean_ci(v) for m, v in row.items()} for variant, row in by_variant.items()}


def plot_pass_at_k(summary: dict, path: str) -> None:
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for variant, row in summary.items():
    ks = sorted(int(m.split("@")[1]) for m in row if m.startswith("pass@"))
    mean = np.array([row[f"pass@{k}"][0] for k in ks])
    ci = np.array([row[f"pass@{k}"][1] for k in ks])
    ax.plot(ks, mean, marker="o", ms=3, label=variant)
    ax.fill_between(ks, mean - ci, mean + ci, alpha=0.15)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("k")
  ax.set_ylabel("pass@k (held-out)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def heatmap(config, model_dir: str, responses_path: str, count: int) -> list:
  """(decoded tokens, entropies) of the first `count` responses, recomputed by a forward pass."""
  import transformers
  from explore_jax.data import templates
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  model_cfg, params = checkpoint.load_model(model_dir)
  with open(responses_path) as f:
    rows = [json.loads(line) for line in f][:count]
  prompts = [tokenizer(templates.apply_template("synthetic", r["prompt"].rstrip("\n")),
                       add_special_tokens=False)["input_ids"] if "prompt" in r else [] for r in rows]
  prompts = [p or [tokenizer.eos_token_id] for p in prompts]
  tokens = [r["tokens"] for r in rows]
  ents = analyze.token_entropies(model_cfg, params, prompts, tokens)
  return [([tokenizer.decode([t]) for t in toks], e.tolist()) for toks, e in zip(tokens, ents)]


def format_cell(mean: float, ci: float, seeds: int) -> str:
  """One cell of the report's table: the mean, and over several seeds the 95% half-width."""
  return f"{mean:.3f} ± {ci:.3f}" if seeds > 1 else f"{mean:.3f}"


def write_report(workdir: str, config, summary: dict, base_acc: float, runs: dict,
                 heat: list, titles: list[str]) -> str:
  plots.plot_training_curves({name: os.path.join(workdir, "runs", name) for name in runs},
                             os.path.join(workdir, "training_curves.png"))
  plot_pass_at_k(summary, os.path.join(workdir, "pass_at_k.png"))
  with open(os.path.join(workdir, "entropy_heatmap.html"), "w") as f:
    f.write(plots.entropy_html(heat, titles, title="Token entropy of held-out responses"))
  n = config.eval.benchmarks.heldout.n
  ks = [k for k in evaluate.k_values(n)]
  cols = ["avg@n"] + [f"pass@{k}" for k in ks] + ["mean_length", "bare_answers"]
  lines = [
      "# explore_jax demo: entropy-based advantage at CPU scale", "",
      f"Seeds: {config.seeds}; RL steps per run: {config.train.total_steps}; held-out problems: "
      f"{config.eval.benchmarks.heldout.max_problems}, {n} samples each (temperature "
      f"{config.eval.sampling.temperature}, top-p {config.eval.sampling.top_p}).",
      f"Base model held-out greedy accuracy after pre-training: {base_acc:.3f}.", "",
      "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for variant, row in summary.items():
    cells = [format_cell(*row[c], seeds=config.seeds) for c in cols]
    lines.append(f"| {variant} | " + " | ".join(cells) + " |")
  lines += ["", "± is the half-width of a 95% t-interval over seeds." if config.seeds > 1 else "",
            "", "![pass@k](pass_at_k.png)", "", "![training curves](training_curves.png)", "",
            "Token-entropy heatmap: [entropy_heatmap.html](entropy_heatmap.html)", ""]
  md = "\n".join(lines)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(md)
  table = "".join(f"<p>{html.escape(line)}</p>" for line in lines[2:4])  # lines[0]: the <h1>
  rows = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.split("|")[1:-1])
                 + "</tr>" for line in lines[5:5 + 2 + len(summary)] if "---" not in line)
  body = (f"<h1>explore_jax demo</h1>{table}<table border=1 cellpadding=4>{rows}</table>"
          "<p><img src='pass_at_k.png'></p><p><img src='training_curves.png' width='100%'></p>"
          "<p><a href='entropy_heatmap.html'>Token-entropy heatmap</a></p>")
  with open(os.path.join(workdir, "report.html"), "w") as f:
    f.write(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>explore_jax demo</title>"
            f"</head><body style='font-family:sans-serif'>{body}</body></html>")
  return os.path.join(workdir, "report.md")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  provenance.note_start(workdir)
  t0 = time.perf_counter()
  _say(f"1/4 base model: pre-training a tiny Qwen2 on the synthetic task ({workdir})")
  base = pretrain.base_model(config.train,
                             root=config.base_model_dir or os.path.join(workdir, "base_model"))
  with open(os.path.join(base, "pretrain.json")) as f:
    base_acc = json.load(f)["heldout_greedy_accuracy"]
  _say(f"    base model held-out greedy accuracy {base_acc:.3f} ({base})")

  runs = {}
  for seed in range(config.seeds):
    for variant in config.variants:
      name = run_name(variant, seed)
      _say(f"2/4 RL: {name} ({config.train.total_steps} steps)")
      run_dir = os.path.join(workdir, "runs", name)
      train.train(variant_config(config, variant, seed, base), run_dir)
      runs[name] = (variant, seed)

  _say("3/4 evaluation: held-out pass@k of the base and every trained model")
  models_dir = os.path.join(workdir, "models")
  os.makedirs(models_dir, exist_ok=True)
  links = {"base": base, **{name: os.path.join(workdir, "runs", name, "hf") for name in runs}}
  for label, target in links.items():
    link = os.path.join(models_dir, label)
    if os.path.islink(link) and os.readlink(link) != os.path.abspath(target):
      os.remove(link)  # e.g. a base model rebuilt under a new key
    if not os.path.islink(link):
      os.symlink(os.path.abspath(target), link)
  eval_cfg = ml_collections.ConfigDict(config.eval.to_dict())
  eval_cfg.models = tuple(os.path.join(models_dir, label) for label in links)
  results = evaluate.run(eval_cfg, os.path.join(workdir, "eval"))

  _say("4/4 report")
  labels = {"base": ("base", 0), **runs}
  summary = summarize(results, labels, os.path.join(workdir, "eval"))
  heat, titles = [], []
  for label in ("base",) + tuple(run_name(v, 0) for v in config.variants):
    path = os.path.join(workdir, "eval", label, "heldout", "responses.jsonl")
    heat += heatmap(config, links[label], path, config.heatmap_responses)
    titles += [f"{label} #{i}" for i in range(config.heatmap_responses)]
  report = write_report(workdir, config, summary, base_acc, runs, heat, titles)
  out = {"base_heldout_greedy_accuracy": base_acc, "summary": summary,
         "seconds": time.perf_counter() - t0}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(out, f, indent=2)
  _say(f"done in {out['seconds']:.0f} s. Report: {os.path.abspath(report)} (and report.html)")
  return out


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.WARNING)
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(os.path.abspath(_WORKDIR.value), "jax_cache"))
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Demo config.",
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where everything goes.")
  app.run(main)
