"""Entropy analyses on constructed inputs with known answers; teacher-forced entropies vs HF."""

from __future__ import annotations

import json

import numpy as np
import pytest

from explore_jax.evaluation import analyze

FILLER = ("the", "number", "is", "equal", "to", "we", "have", "sum", "of", "two", "and", "value",
          "x", "square", "root", "gives", "result", "also", "sole", "sofa")


def _words_to_tokens(words):
  return [(" " if i else "") + w for i, w in enumerate(words)]


def test_pivotal_mask_whole_words_and_split_tokens():
  toks = ["So", " also", " there", "fore", " x", " is", " sole", ",", " but", " BUT", "ter",
          " let me", " wait"]
  mask = analyze.pivotal_token_mask(toks, ("so", "therefore", "but", "let me", "wait"))
  # "So" yes; "also"/"sole"/"butter" no (whole words only); "there"+"fore" both; case-insensitive.
  assert mask.tolist() == [True, False, True, True, False, False, False, False, True, False, False,
                           True, True]


def test_line_start_mask_marks_each_line_s_first_character():
  # Countdown's forks: the token that starts each line (a move or a check), whatever the
  # tokenisation; leading spaces, blank lines and a token that ends one line and starts the next.
  toks = ["7", " *", " 3", " =", " 21", "\n", "21", " +", " 5", "\n\n", "  ch", "eck", ":", " 26",
          "\n5", " - 3"]
  assert analyze.line_start_mask(toks).tolist() == [
      True, False, False, False, False, False, True, False, False, False, True, False, False,
      False, True, False]


def test_fork_analysis_planted_effect():
  rng = np.random.default_rng(2)
  responses = []
  for _ in range(30):
    toks = ["1", " +", " 2", " =", " 3", "\n", "3", " *", " 4", " =", " 12", "\n", "\\boxed{}"]
    mask = analyze.line_start_mask(toks)
    responses.append((toks, rng.gamma(2.0, 0.2, size=len(toks)) + 1.0 * mask))
  out = analyze.fork_analysis(responses)
  assert out["n_a"] == 90 and out["n_b"] == 300
  assert out["mean_a"] > out["mean_b"] + 0.8 and out["p_welch"] < 1e-6


def test_split_sentences_and_sentence_entropies():
  text = "First, 3 + 4 = 7. Wait, check: 7 * 2 = 14!\n\n3.5 is not an integer?  Done"
  spans = analyze.split_sentences(text)
  assert [text[s:e] for s, e in spans] == ["First, 3 + 4 = 7.", "Wait, check: 7 * 2 = 14!",
                                           "3.5 is not an integer?", "Done"]
  toks = ["Hello", " world", ".", " Wait", " now", ".\n", "Ok"]
  ents = [1.0, 2.0, 3.0, 10.0, 20.0, 30.0, 5.0]
  got = analyze.sentence_entropies(toks, ents)
  # ".\n" starts with "." in sentence 2; the whitespace-only part belongs to nobody.
  assert got == [("Hello world.", 2.0), ("Wait now.", 20.0), ("Ok", 5.0)]
  with pytest.raises(ValueError, match="2 tokens but 1"):
    analyze.sentence_entropies(["a", "b"], [1.0])


def test_compare_statistics():
  out = analyze.compare([1.0, 2.0, 3.0], [2.0, 3.0, 4.0], "a", "b")
  assert out["cohens_d"] == pytest.approx(-1.0)  # both SDs are 1
  assert out["mean_a"] == 2.0 and out["n_b"] == 3 and out["sem_a"] == pytest.approx(1 / np.sqrt(3))
  from scipy import stats
  assert out["p_welch"] == pytest.approx(stats.ttest_ind([1, 2, 3], [2, 3, 4]).pvalue)
  with pytest.raises(ValueError, match="need >= 2"):
    analyze.compare([1.0], [1.0, 2.0], "a", "b")


def _pivotal_corpus(rng, shift):
  responses = []
  for _ in range(40):
    words = [rng.choice(FILLER) if rng.random() > 0.15 else rng.choice(analyze.PIVOTAL_WORDS)
             for _ in range(60)]
    toks = _words_to_tokens(words)
    mask = analyze.pivotal_token_mask(toks)
    ents = rng.gamma(2.0, 0.5, size=len(toks)) + shift * mask
    responses.append((toks, ents))
  return responses


def test_pivotal_planted_effect_and_null():
  rng = np.random.default_rng(0)
  hit = analyze.pivotal_analysis(_pivotal_corpus(rng, shift=0.8))
  assert hit["p_welch"] < 0.01 and hit["p_mannwhitney"] < 0.01
  assert hit["mean_a"] > hit["mean_b"] + 0.5 and hit["cohens_d"] > 0.5
  null = analyze.pivotal_analysis(_pivotal_corpus(rng, shift=0.0))
  assert null["p_welch"] > 0.01 and abs(null["cohens_d"]) < 0.2


def _reflective_corpus(rng, shift):
  plain = ["Add the two numbers.", "The sum is 12.", "Multiply by three.", "So x equals 4."]
  reflect = ["Wait, let me check that step.", "We verify: 3 * 4 = 12.", "Let me double-check."]
  responses = []
  for _ in range(30):
    toks, ents = [], []
    for _ in range(8):
      is_reflective = rng.random() < 0.25
      sent = rng.choice(reflect if is_reflective else plain)
      words = _words_to_tokens(sent.split())
      words[0] = (" " if toks else "") + words[0]
      toks += words
      ents += list(rng.gamma(2.0, 0.5, size=len(words)) + shift * is_reflective)
    responses.append((toks, ents))
  return responses


def test_reflective_planted_effect_and_null():
  rng = np.random.default_rng(1)
  hit = analyze.reflective_analysis(_reflective_corpus(rng, shift=1.0))
  assert hit["p_welch"] < 0.01 and hit["mean_a"] > hit["mean_b"] + 0.7
  assert hit["n_a"] > 20 and hit["n_b"] > 100
  null = analyze.reflective_analysis(_reflective_corpus(rng, shift=0.0))
  assert null["p_welch"] > 0.01


def test_knn_distance_matches_loop():
  rng = np.random.default_rng(2)
  q, r = rng.normal(size=(7, 5)), rng.normal(size=(11, 5))
  got = analyze.knn_distance(q, r, k=3, block=3)
  for i in range(7):
    d = sorted(1 - q[i] @ r[j] / np.linalg.norm(q[i]) / np.linalg.norm(r[j]) for j in range(11))
    assert got[i] == pytest.approx(np.mean(d[:3]))


def _rare_corpus(rng, shift):
  common = [f"Then {a} plus {b} equals {a + b}." for a in range(2, 9) for b in range(3, 7)]
  odd = ["Alternatively, picture the problem as a circle inscribed in a triangle.",
         "Perhaps a generating function over the partitions is cleaner.",
         "Consider the contrapositive and argue by induction on the degree.",
         "Think of it as a random walk on a graph with absorbing states."]
  responses = []
  for _ in range(10):
    toks, ents = [], []
    for _ in range(10):
      is_rare = rng.random() < 0.1
      words = _words_to_tokens(rng.choice(odd if is_rare else common).split())
      words[0] = (" " if toks else "") + words[0]
      toks += words
      ents += list(rng.gamma(2.0, 0.5, size=len(words)) + shift * is_rare)
    responses.append((toks, ents))
  return responses, common


@pytest.fixture(scope="session")
def embedder():
  return analyze.load_embedder()


@pytest.mark.slow
def test_rare_behaviours_with_sentence_embeddings(embedder):
  rng = np.random.default_rng(3)
  responses, base = _rare_corpus(rng, shift=1.5)
  hit = analyze.rare_analysis(responses, base, embedder, k=3)
  assert hit["p_welch"] < 0.01 and hit["mean_a"] > hit["mean_b"] + 1.0
  odd = {s for toks, _ in responses for s, _ in analyze.sentence_entropies(toks, [0.0] * len(toks))
         if not s.startswith("Then")}
  assert odd and hit["rarest"][0]["sentence"] in odd
  null = analyze.rare_analysis(_rare_corpus(rng, shift=0.0)[0], base, embedder, k=3)
  assert null["p_welch"] > 0.01


def test_token_entropies_match_transformers(tiny_hf_model):
  import torch
  m = tiny_hf_model
  rng = np.random.default_rng(4)
  prompts = [rng.integers(3, 96, size=p).tolist() for p in (5, 9, 3)]
  responses = [rng.integers(3, 96, size=r).tolist() for r in (7, 2, 12)]
  got = analyze.token_entropies(m.config, m.params, prompts, responses, batch_size=2, chunk=8,
                                bucket=8)
  for p, r, g in zip(prompts, responses, got):
    logits = m.hf_logits(np.array([p + r]))[0]
    logp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), -1).numpy()
    want = -(np.exp(logp) * logp).sum(-1)[len(p) - 1:len(p) - 1 + len(r)]
    assert g.shape == (len(r),)
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4)
  hot = analyze.token_entropies(m.config, m.params, prompts[:1], responses[:1], temperature=2.0)
  assert np.all(hot[0] > got[0])  # a flatter distribution has higher entropy


def test_analyze_cli(tmp_path, embedder):
  from test_evaluate import make_model_dir
  model = make_model_dir(str(tmp_path / "model"))
  texts = ["First add 3 and 4, so we get 7. Wait, let me check: 3 + 4 = 7. Then the answer is 7.",
           "We multiply, because 2 * 6 = 12. However, verify the sign. Thus 12 is the result.",
           "Next, 5 - 1 = 4. So the answer is 4. Let me double-check the subtraction."]
  recs = [{"problem_id": str(i), "sample": 0, "prompt": f"Compute {i}.\n", "response": t,
           "correct": bool(i % 2), "tokens": list(t.encode()) + [256]}
          for i, t in enumerate(texts * 3)]
  path = tmp_path / "responses.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in recs))
  base = tmp_path / "base.jsonl"
  base.write_text("".join(json.dumps({"prompt": "p", "response": f"Then {a} + {a} = {2 * a}."})
                          + "\n" for a in range(30)))
  out = tmp_path / "out"
  res = analyze.main(["--responses", str(path), "--model", model, "--out", str(out),
                      "--base_responses", str(base), "--html_responses", "2"])
  saved = json.loads((out / "analysis.json").read_text())
  assert set(saved) == {"pivotal", "reflective", "rare"} and saved == json.loads(json.dumps(res))
  assert saved["reflective"]["n_a"] == 9  # one "check"/"verify"/"double-check" sentence each
  html = (out / "entropy.html").read_text()
  # Two responses, one span per byte token (EOS dropped).
  assert html.count("<h3>") == 2 and html.count("<span") == len(texts[0]) + len(texts[1])
  assert (out / "comparisons.png").stat().st_size > 1000
