r"""The main job: the paper's experiment at CPU scale, end to end, in one command.

    python -m explore_jax.demo --config configs/demo.py --workdir runs/demo      # make demo
    python -m explore_jax.demo --config configs/demo.py:plan=study --workdir runs/study  # make study
    python -m explore_jax.demo --config configs/demo.py:plan=suite --workdir runs/suite  # make suite

1. a tiny Qwen2 "base model" is pre-trained on the task's demonstrations (countdown: random
   attempts, a few of them checking and retrying; cached in the workdir);
2. for each seed, every arm of `config.arms` (GRPO baseline, GRPO + entropy advantage, ...) is
   trained from it with the same data order, budget and seed (`explore_jax.train`);
3. the base and every trained model are evaluated on the held-out split: avg@n and pass@k for
   k = 1..n (`explore_jax.evaluation.evaluate`, the paper's sampling protocol);
4. each arm is compared with the baseline, paired by seed and by problem (`explore_jax.evaluation.compare`:
   t-interval over seeds, bootstrap over problems, coverage counts, the random-attempt floor);
   the paper's three entropy analyses run on each arm's seed-0 responses (`explore_jax.evaluation.analyze`);
   `report.md` / `report.html` gather it all with pass@k and training curves and a token-entropy
   view of responses, and `results.json` has every figure.

Every stage resumes: a second run of the same command only redoes what is missing. An RL run
whose settings changed is refused, naming them; the evaluation of a model since retrained is
sampled again (the old responses are kept as responses.stale.jsonl).
"""

from __future__ import annotations

import html
import json
import os
import time

import markdown_it
import matplotlib
import ml_collections
import numpy as np
from scipy import stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from explore_jax import paths, provenance
from explore_jax.config import defaults
from explore_jax.data import countdown, templates
from explore_jax.demo import pretrain
from explore_jax.evaluation import analyze, compare, evaluate, plots
from explore_jax.models import checkpoint
from explore_jax.train import loop
from explore_jax.train import metrics as metrics_io


def _say(msg: str) -> None:
  print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_name(arm: str, seed: int) -> str:
  return f"{arm}_s{seed}"


def arm(variant: str, **rl) -> ml_collections.ConfigDict:
  """One arm of `config.arms`: a variant of `defaults.apply_variant`, then `rl.*` overrides."""
  return ml_collections.ConfigDict(dict(variant=variant, rl=rl))


def arm_config(config: ml_collections.ConfigDict, name: str, seed: int, base: str):
  c = ml_collections.ConfigDict(config.train.to_dict())
  defaults.apply_variant(c, config.arms[name].variant)
  c.rl.update(config.arms[name].rl.to_dict())
  c.seed = seed
  c.model.path = base
  return c


def mean_ci(values) -> tuple[float, float]:
  """Mean and half-width of the 95% t-interval (0 for a single value)."""
  v = np.asarray(values, np.float64)
  if v.size < 2:
    return float(v.mean()), 0.0
  return float(v.mean()), float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))


# The task's behaviour the report counts in held-out responses: summary column -> test.
BEHAVIOURS = {
    "countdown": ("retries", lambda response: countdown.count_retries(response) > 0),
    "synthetic_arithmetic": ("bare_answers", lambda response: response.lstrip().startswith(
        "\\boxed")),
}


def read_responses(path: str, problem_ids: set[str]) -> list[dict]:
  with open(path) as f:
    recs = [r for r in map(json.loads, filter(str.strip, f)) if str(r["problem_id"]) in problem_ids]
  if not recs:
    raise ValueError(f"{path}: no responses to the evaluated problems")
  return recs


def summarize(results: dict, labels: dict[str, tuple[str, int]], eval_dir: str,
              dataset: str, per_problem: dict) -> dict:
  """{arm: {metric: (mean, ci)}} over seeds, from evaluate's results and responses."""
  column, test = BEHAVIOURS[dataset]
  by_arm: dict[str, dict[str, list[float]]] = {}
  for label, (name, _) in labels.items():
    bench = results["models"][label]["benchmarks"]["heldout"]
    row = by_arm.setdefault(name, {})
    recs = read_responses(os.path.join(eval_dir, label, "heldout", "responses.jsonl"),
                          set(per_problem[label]))
    row.setdefault("avg@n", []).append(bench["avg@n"])
    for k, v in bench["pass@k"].items():
      row.setdefault(f"pass@{k}", []).append(v)
    row.setdefault("mean_length", []).append(bench["mean_length"])
    row.setdefault(column, []).append(float(np.mean([test(r["response"]) for r in recs])))
  return {name: {m: mean_ci(v) for m, v in row.items()} for name, row in by_arm.items()}


def guess_floor(config, problem_ids, ks) -> dict[int, float] | None:
  """pass@k of uniformly random legal attempts on the evaluated countdown problems."""
  if config.eval.benchmarks.heldout.dataset != "countdown":
    return None
  task = countdown.CountdownConfig(**config.eval.countdown.to_dict())
  rates = {r["id"]: r["solve_rate"] for r in countdown.load_split("test", task)}
  return compare.guess_floor([rates[p] for p in sorted(problem_ids)], ks)


def plot_pass_at_k(summary: dict, floor: dict | None, path: str) -> None:
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for name, row in summary.items():
    ks = sorted(int(m.split("@")[1]) for m in row if m.startswith("pass@"))
    mean = np.array([row[f"pass@{k}"][0] for k in ks])
    ci = np.array([row[f"pass@{k}"][1] for k in ks])
    ax.plot(ks, mean, marker="o", ms=3, label=name)
    ax.fill_between(ks, mean - ci, mean + ci, alpha=0.15)
  if floor:
    ax.plot(sorted(floor), [floor[k] for k in sorted(floor)], "k:", label="random attempts")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("k")
  ax.set_ylabel("pass@k (held-out)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def entropies_of(config, model_dir: str, responses_path: str, count: int) -> list:
  """(decoded tokens, entropies) of the first `count` responses, recomputed under the model."""
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  model_cfg, params = checkpoint.load_model(model_dir)
  with open(responses_path) as f:
    rows = [json.loads(line) for line in f][:count]
  template = config.eval.benchmarks.heldout.template
  prompts = [tokenizer(templates.apply_template(template, r["prompt"].rstrip("\n")),
                       add_special_tokens=False)["input_ids"] for r in rows]
  eos = tokenizer.eos_token_id
  tokens = [r["tokens"][:r["tokens"].index(eos)] if eos in r["tokens"] else r["tokens"]
            for r in rows]
  ents = analyze.token_entropies(model_cfg, params, prompts, tokens, batch_size=64)
  return [([tokenizer.decode([t]) for t in toks], e.tolist()) for toks, e in zip(tokens, ents)]


def paper_analyses(config, responses: dict[str, list], base_texts: list[str]) -> dict:
  """{model: {analysis: compare(...)}}: fork (or pivotal) tokens, reflective sentences and, for
  the RL models when `analysis.rare`, rare sentences against the base model's."""
  forks = config.eval.benchmarks.heldout.dataset == "countdown"
  token_analysis = analyze.fork_analysis if forks else analyze.pivotal_analysis
  base_sents = sorted({t[s:e] for t in base_texts for s, e in analyze.split_sentences(t)})
  out = {}
  for label, data in responses.items():
    runs = {"forks" if forks else "pivotal":
            lambda d=data: token_analysis(d),
            "reflective": lambda d=data: analyze.reflective_analysis(d)}
    if config.analysis.rare and label != "base":
      runs["rare"] = lambda d=data: analyze.rare_analysis(d, base_sents, analyze.load_embedder())
    out[label] = {}
    for name, fn in runs.items():
      try:
        out[label][name] = fn()
      except analyze.TooFewValues as e:
        out[label][name] = {"skipped": str(e)}
  return out


# The exploration suite's selections, as the trainer logs them: metric -> what the share counts.
SELECTED_SHARES = {
    "actor/clip_cov_frac": "Clip-Cov: tokens whose gradient is cut",
    "actor/clip_cov_candidate_frac": "Clip-Cov: candidates (cov in (lb, ub), not clipped)",
    "actor/kl_cov_frac": "KL-Cov: tokens with the log-ratio penalty",
    "actor/top_entropy_frac": "top-entropy: tokens with a policy gradient",
}


def selected_shares(workdir: str, by_arm: dict[str, list[str]]) -> dict:
  """{arm: {metric: (mean, lowest seed, highest seed)}}: the suite's selected shares of tokens,
  each run's mean over its steps; arms that log none are left out."""
  out = {}
  for name, labels in by_arm.items():
    runs = [metrics_io.read_metrics(os.path.join(workdir, "runs", label)) for label in labels]
    per_seed = {m: [float(np.mean([r[m] for r in rows])) for rows in runs]
                for m in SELECTED_SHARES if all(rows and m in rows[0] for rows in runs)}
    if per_seed:
      out[name] = {m: (float(np.mean(v)), min(v), max(v)) for m, v in per_seed.items()}
  return out


def share_lines(shares: dict) -> list[str]:
  if not shares:
    return []
  lines = ["", "## Tokens the suite's arms select", "",
           "Share of a mini-batch's response tokens, mean over the run's updates, then over seeds "
           "(lowest and highest seed in brackets).", "",
           "| arm | selection | share |", "|---|---|---|"]
  for name, row in shares.items():
    for metric, (mean, lo, hi) in row.items():
      lines.append(f"| {name} | {SELECTED_SHARES[metric]} | {mean:.4f} [{lo:.4f}, {hi:.4f}] |")
  return lines


def format_cell(mean: float, ci: float, seeds: int) -> str:
  """One cell of the report's table: the mean, and over several seeds the 95% half-width."""
  return f"{mean:.3f} ± {ci:.3f}" if seeds > 1 else f"{mean:.3f}"


def _interval(iv) -> str:
  return "n/a (1 seed)" if iv is None else f"[{iv[0]:+.3f}, {iv[1]:+.3f}]"


def report_lines(config, summary: dict, base_acc: float, floor, comparison: dict,
                 analyses: dict, shares: dict | None = None) -> list[str]:
  n = config.eval.benchmarks.heldout.n
  ks = evaluate.k_values(n)
  behaviour = BEHAVIOURS[config.eval.benchmarks.heldout.dataset][0]
  cols = ["avg@n"] + [f"pass@{k}" for k in ks] + ["mean_length", behaviour]
  lines = [
      "# explore_jax: the entropy advantage at CPU scale", "",
      f"Task: {config.eval.benchmarks.heldout.dataset}. Seeds: {config.seeds}; RL steps per run: "
      f"{config.train.total_steps}; held-out problems: {comparison['problems']}, {n} samples each "
      f"(temperature {config.eval.sampling.temperature}, top-p {config.eval.sampling.top_p}). "
      f"Base model held-out greedy accuracy after pre-training: {base_acc:.3f}.", "",
      "## Held-out results", "",
      "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for name, row in summary.items():
    lines.append(f"| {name} | " + " | ".join(format_cell(*row[c], seeds=config.seeds)
                                          for c in cols) + " |")
  lines += ["", ("± is the half-width of a 95% t-interval over seeds. " if config.seeds > 1
                 else "One seed: no interval over seeds. ") + f"`{behaviour}`: share of responses "
            "showing the task's behaviour (countdown: a check that retries)."]
  if floor:
    lines += ["", "Floor: a bare number scores 0 (the reward evaluates the expression); uniformly "
              "random legal attempts reach " + ", ".join(f"pass@{k} {floor[k]:.3f}" for k in ks
                                                          if k in floor) + "."]
  lines += ["", "## Paired differences against the baseline", "",
            f"Arm minus baseline, same seeds and problems ({comparison['seeds']} seeds, "
            f"{comparison['problems']} problems): a 95% t-interval over the seeds' mean "
            "differences and a 95% bootstrap interval over problems within seeds "
            "(explore_jax/evaluation/compare.py says what each carries). Coverage: problems solved by at "
            f"least one of the {n} samples of one side and none of the other's, per seed.", "",
            "| arm | metric | difference | t-interval (seeds) | bootstrap (problems) |",
            "|---|---|---|---|---|"]
  for name, row in comparison["arms"].items():
    for metric in comparison["columns"]:
      r = row[metric]
      lines.append(f"| {name} | {metric} | {r['diff']:+.3f} | {_interval(r['t_interval'])} | "
                   f"{_interval(r['bootstrap'])} |")
  lines += ["", "| arm | solved by the arm only | by the baseline only | by both | by neither |",
            "|---|---|---|---|---|"]
  for name, row in comparison["arms"].items():
    cov = row["coverage"]
    lines.append(f"| {name} | " + " | ".join(", ".join(map(str, map(int, cov[k]))) for k in (
        "arm_only", "baseline_only", "both", "neither")) + " |")
  lines += share_lines(shares or {})
  lines += ["", "![pass@k](pass_at_k.png)", "", "## Training curves", "",
            "Mean over seeds, band from the lowest to the highest seed.", "",
            "![training curves](training_curves.png)", "",
            "## The paper's entropy analyses", "",
            f"The first {config.analysis.responses} held-out responses of each model (seed 0), "
            "entropies recomputed under that model; tokens and sentences treated as independent "
            "draws, as in the paper (explore_jax/evaluation/analyze.py).", "",
            "| model | analysis | group | mean H (n) | rest | mean H (n) | Welch t (p) | "
            "Mann-Whitney p | Cohen's d |", "|---|---|---|---|---|---|---|---|---|"]
  for label, res in analyses.items():
    for name, r in res.items():
      if "skipped" in r:
        lines.append(f"| {label} | {name} | skipped: {r['skipped']} | | | | | | |")
        continue
      lines.append(f"| {label} | {name} | {r['label_a']} | {r['mean_a']:.3f} ({r['n_a']}) | "
                   f"{r['label_b']} | {r['mean_b']:.3f} ({r['n_b']}) | {r['t_welch']:.2f} "
                   f"({r['p_welch']:.2g}) | {r['p_mannwhitney']:.2g} | {r['cohens_d']:.2f} |")
  lines += ["", "Token entropy of held-out responses, forks included: "
            "[entropy_heatmap.html](entropy_heatmap.html)", ""]
  return lines


def write_report(workdir: str, lines: list[str]) -> str:
  md = "\n".join(lines)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(md)
  body = markdown_it.MarkdownIt("commonmark", {"html": False}).enable("table").render(md)
  style = ("body{font-family:sans-serif;max-width:75em;margin:1.5em auto;padding:0 1em}"
           "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;"
           "padding:.25em .6em;text-align:left}img{max-width:100%}")
  with open(os.path.join(workdir, "report.html"), "w") as f:
    f.write(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>"
            f"{html.escape(lines[0].lstrip('# '))}</title><style>{style}</style></head>"
            f"<body>{body}</body></html>")
  return os.path.join(workdir, "report.md")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  workdir = paths.absolute(workdir)  # one place, whatever later changes the current directory
  os.makedirs(workdir, exist_ok=True)
  provenance.note_start(workdir)
  t0 = time.perf_counter()
  _say(f"1/4 base model: pre-training a tiny Qwen2 on {config.train.data.name} ({workdir})")
  base = pretrain.base_model(config.train,
                             root=config.base_model_dir or os.path.join(workdir, "base_model"))
  with open(os.path.join(base, "pretrain.json")) as f:
    base_acc = json.load(f)["heldout_greedy_accuracy"]
  _say(f"    base model held-out greedy accuracy {base_acc:.3f} ({base})")

  runs = {}
  for seed in range(config.seeds):
    for name in config.arms:
      label = run_name(name, seed)
      _say(f"2/4 RL: {label} ({config.train.total_steps} steps)")
      loop.train(arm_config(config, name, seed, base), os.path.join(workdir, "runs", label))
      runs[label] = (name, seed)

  _say("3/4 evaluation: held-out pass@k of the base and every trained model")
  models_dir = os.path.join(workdir, "models")
  os.makedirs(models_dir, exist_ok=True)
  links = {"base": base, **{label: os.path.join(workdir, "runs", label, "hf") for label in runs}}
  for label, target in links.items():
    link = os.path.join(models_dir, label)
    if os.path.islink(link) and os.readlink(link) != os.path.abspath(target):
      os.remove(link)  # e.g. a base model rebuilt under a new key
    if not os.path.islink(link):
      os.symlink(os.path.abspath(target), link)
  eval_cfg = ml_collections.ConfigDict(config.eval.to_dict())
  eval_cfg.models = tuple(os.path.join(models_dir, label) for label in links)
  eval_dir = os.path.join(workdir, "eval")
  results = evaluate.run(eval_cfg, eval_dir)

  _say("4/4 comparison, the paper's analyses and the report")
  labels = {"base": ("base", 0), **runs}
  per_problem = compare.read_per_problem(os.path.join(eval_dir, "per_problem.csv"), "heldout")
  summary = summarize(results, labels, eval_dir, config.eval.benchmarks.heldout.dataset,
                      per_problem)
  n = config.eval.benchmarks.heldout.n
  columns = [f"pass@{k}" for k in (1, 4, 16, 64) if k <= n]
  by_arm = {name: [run_name(name, s) for s in range(config.seeds)] for name in config.arms}
  comparison = compare.compare_arms(per_problem, by_arm, config.baseline_arm, columns,
                                    draws=config.bootstrap_draws)
  comparison["columns"] = columns
  floor = guess_floor(config, per_problem["base"], evaluate.k_values(n))
  shown = ("base",) + tuple(run_name(name, 0) for name in config.arms)
  responses = {label: entropies_of(config, links[label], os.path.join(
      eval_dir, label, "heldout", "responses.jsonl"), config.analysis.responses) for label in shown}
  with open(os.path.join(eval_dir, "base", "heldout", "responses.jsonl")) as f:
    base_texts = [json.loads(line)["response"] for line in f if line.strip()]
  analyses = paper_analyses(config, responses, base_texts)

  plots.plot_arm_curves({name: [os.path.join(workdir, "runs", label) for label in labels]
                         for name, labels in by_arm.items()},
                        os.path.join(workdir, "training_curves.png"))
  plot_pass_at_k(summary, floor, os.path.join(workdir, "pass_at_k.png"))
  heat = [r for label in shown for r in responses[label][:config.heatmap_responses]]
  titles = [f"{label} #{i}" for label in shown for i in range(config.heatmap_responses)]
  forks = config.eval.benchmarks.heldout.dataset == "countdown"
  with open(os.path.join(workdir, "entropy_heatmap.html"), "w") as f:
    f.write(plots.entropy_html(
        heat, titles, title="Token entropy of held-out responses",
        marks=[analyze.line_start_mask(toks) for toks, _ in heat] if forks else None,
        mark_label="fork tokens (line starts: the next move's first number, or a check)"))
  shares = selected_shares(workdir, by_arm)
  report = write_report(workdir, report_lines(config, summary, base_acc, floor, comparison,
                                              analyses, shares))
  out = {"base_heldout_greedy_accuracy": base_acc, "summary": summary, "comparison": comparison,
         "random_attempt_floor": floor, "analyses": analyses, "selected_shares": shares,
         "seconds": time.perf_counter() - t0}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(out, f, indent=2)
  _say(f"done in {out['seconds']:.0f} s. Report: {os.path.abspath(report)} (and report.html)")
  return out
