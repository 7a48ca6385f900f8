"""pass@k against exact combinatorics; the evaluate CLI end to end on a tiny model; resume; the
same evaluation on a mesh of 8 fake devices and on 2 processes."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from explore_jax.evaluation import evaluate
from explore_jax.evaluation.evaluate import pass_at_k

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------------------------------
# pass@k
# --------------------------------------------------------------------------------------------------


def _brute_pass_at_k(n, c, k):
  """Fraction of all k-subsets of n samples (the first c correct) that hold a correct sample."""
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_enumeration_over_subsets():
  for n in range(1, 9):
    for k in range(1, n + 1):
      got = pass_at_k(n, np.arange(n + 1), k)
      want = [_brute_pass_at_k(n, c, k) for c in range(n + 1)]
      np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15, err_msg=f"n={n} k={k}")


def test_pass_at_k_exact_for_n_256():
  n = 256
  cs = np.arange(n + 1)
  for k in (1, 2, 3, 16, 64, 128, 200, 255, 256):
    got = pass_at_k(n, cs, k)
    assert np.all(np.isfinite(got))
    want = np.array([float(1 - Fraction(math.comb(n - c, k), math.comb(n, k))) for c in cs])
    # Relative accuracy also where pass@k is tiny (c = 1: k/n) or within 1e-300 of 1.
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0, err_msg=f"k={k}")
  assert pass_at_k(256, 1, 1) == pytest.approx(1 / 256, rel=1e-14)


def test_pass_at_k_edge_cases_and_scalars():
  assert pass_at_k(256, 0, 256) == 0.0 and pass_at_k(16, 0, 1) == 0.0
  assert pass_at_k(256, 256, 1) == 1.0
  assert pass_at_k(10, 3, 8) == 1.0  # k > n - c: every 8-subset holds a correct sample
  assert pass_at_k(10, 2, 8) == pytest.approx(1 - 1 / 45, rel=1e-14)  # C(8,8)/C(10,8)
  assert isinstance(pass_at_k(10, 3, 2), float)
  assert pass_at_k(10, np.array([[1, 2], [3, 4]]), 2).shape == (2, 2)
  for bad in [(10, 11, 1), (10, -1, 1), (10, 3, 0), (10, 3, 11), (10, 2.5, 1)]:
    with pytest.raises(ValueError, match="pass_at_k"):
      pass_at_k(*bad)


def test_k_values_and_summary():
  assert evaluate.k_values(16) == [1, 2, 4, 8, 16]
  assert evaluate.k_values(12) == [1, 2, 4, 8, 12]
  s = evaluate.summarize(np.array([0, 2, 4]), 4, [10, 20], [0.0, 0.5], [False, True])
  assert s["avg@n"] == pytest.approx(0.5)
  assert s["pass@k"]["1"] == pytest.approx(0.5)
  # pass@2: problem c=2 -> 1 - C(2,2)/C(4,2) = 5/6; c=4 -> 1.
  assert s["pass@k"]["2"] == pytest.approx((0 + 5 / 6 + 1) / 3)
  assert s["mean_length"] == 15 and s["repetition_rate"] == 0.25 and s["truncated_frac"] == 0.5


def test_repetition_rate_matches_slow_loop():
  rng = np.random.default_rng(0)

  def slow(tokens, n):
    seen, repeats, total = [], 0, 0
    for i in range(len(tokens) - n + 1):
      gram = list(tokens[i:i + n])
      repeats += gram in seen
      seen.append(gram)
      total += 1
    return repeats / total if total else 0.0

  assert evaluate.repetition_rate([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)
  assert evaluate.repetition_rate([7] * 20) == pytest.approx(16 / 17)
  assert evaluate.repetition_rate([1, 2, 3]) == 0.0
  for _ in range(20):
    toks = rng.integers(0, 3, size=rng.integers(0, 40)).tolist()
    assert evaluate.repetition_rate(toks, 3) == pytest.approx(slow(toks, 3))


def test_load_graded_drops_incomplete_problems(tmp_path):
  path = str(tmp_path / "responses.jsonl")
  recs = [{"problem_id": p, "sample": s} for p in ("a", "b") for s in range(3)]
  recs.append({"problem_id": "c", "sample": 0})
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in recs)
    f.write('{"problem_id": "c", "sam')  # killed mid-write
  done = evaluate.load_graded(path, 3)
  assert sorted(done) == ["a", "b"]
  with open(path) as f:
    assert [json.loads(line)["problem_id"] for line in f] == ["a"] * 3 + ["b"] * 3
  with open(path, "a") as f:
    f.writelines(json.dumps({"problem_id": "a", "sample": s}) + "\n" for s in range(2))
  with pytest.raises(ValueError, match="more than n=3"):
    evaluate.load_graded(path, 3)


# --------------------------------------------------------------------------------------------------
# End to end on a tiny random model
# --------------------------------------------------------------------------------------------------


def make_model_dir(path: str, seed: int = 0) -> str:
  """A tiny random Qwen2 (HF layout, via checkpoint.save_hf) with a byte-level tokenizer whose ids
  are the UTF-8 bytes (0..255) plus <|endoftext|> = 256; no torch needed."""
  import jax
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  from explore_jax.models import checkpoint, qwen2

  # GPT-2's byte -> printable character map, so that token id == byte value.
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
               *range(ord("\xae"), ord("\xff") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b], extra = chr(256 + extra), extra + 1
  vocab = {chars[b]: b for b in range(256)}
  assert set(vocab) == set(pre_tokenizers.ByteLevel.alphabet())
  vocab["<|endoftext|>"] = 256
  tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  tk.add_special_tokens(["<|endoftext|>"])
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                             pad_token="<|endoftext|>")
  config = qwen2.Qwen2Config(
      vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
      rope_theta=10000.0, eos_token_id=256, bos_token_id=256)
  # Random numpy weights from the parameter shapes (eval_shape: no XLA compile, which is slow on a
  # busy CPU); scale 0.2 gives logits of O(1), so sampling is far from uniform.
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(qwen2.init_params, config, jax.random.PRNGKey(seed))
  params = jax.tree.map(lambda s: rng.normal(0.0, 0.2, s.shape).astype(np.float32), shapes)
  checkpoint.save_hf(config, params, path)
  tok.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return make_model_dir(str(tmp_path_factory.mktemp("tiny_model")))


def _tiny_config(model_dir, n=4, max_problems=3):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "eval_tiny", os.path.join(REPO, "configs", "eval_tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model = model_dir
  c.batch_size = 2 * n  # two problems per generate call
  c.slots = n  # through half as many decode slots: the engine refills
  c.chunk = 4
  c.sampling.max_new_tokens = 8
  c.benchmarks.synthetic.n = n
  c.benchmarks.synthetic.max_problems = max_problems
  return c


def _check_outputs(workdir, label, n, num_problems):
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)["models"][label]["benchmarks"]["synthetic"]
  with open(os.path.join(workdir, label, "synthetic", "responses.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  with open(os.path.join(workdir, "per_problem.csv")) as f:
    rows = list(csv.DictReader(f))
  assert os.path.getsize(os.path.join(workdir, "passk.png")) > 1000
  assert res["n"] == n and res["num_problems"] == num_problems and len(recs) == n * num_problems
  assert set(res["pass@k"]) == {str(k) for k in evaluate.k_values(n)}
  for key in ("benchmark", "problem_id", "sample", "prompt", "response", "answer", "reward",
              "correct", "length", "finished", "repetition", "tokens"):
    assert key in recs[0], key
  counts = {}
  for r in recs:
    assert r["reward"] in (-1.0, 1.0) and r["correct"] == (r["reward"] > 0)
    assert 1 <= r["length"] <= 8 and r["length"] == len(r["tokens"])
    assert r["finished"] == (256 in r["tokens"])
    counts[r["problem_id"]] = counts.get(r["problem_id"], 0) + r["correct"]
  c = np.array(list(counts.values()))
  assert res["avg@n"] == pytest.approx(np.mean(c / n))
  assert res["pass@k"]["2"] == pytest.approx(np.mean([_brute_pass_at_k(n, x, 2) for x in c]))
  assert res["mean_length"] == pytest.approx(np.mean([r["length"] for r in recs]))
  assert [r["problem_id"] for r in rows] == list(counts)
  assert [int(r["num_correct"]) for r in rows] == c.tolist()
  return res, recs


def _cli(model_dir, workdir, max_problems=3, *extra):
  """The evaluate command of `_tiny_config(model_dir, n=4, max_problems)`."""
  return [sys.executable, "-m", "explore_jax.evaluate", "--config", "configs/eval_tiny.py",
          f"--config.model={model_dir}", f"--workdir={workdir}", "--config.batch_size=8",
          "--config.sampling.max_new_tokens=8", "--config.benchmarks.synthetic.n=4",
          f"--config.benchmarks.synthetic.max_problems={max_problems}",
          "--config.reward_workers=1", *extra]


@pytest.mark.slow
def test_evaluate_cli_end_to_end(model_dir, tmp_path):
  workdir = str(tmp_path / "eval")
  cmd = _cli(model_dir, workdir)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  label = os.path.basename(model_dir)
  _, recs = _check_outputs(workdir, label, 4, 3)
  # The decoded text is the response's tokens up to EOS, through the real tokenizer.
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(model_dir)
  for r in recs:
    body = r["tokens"][:r["tokens"].index(256)] if r["finished"] else r["tokens"]
    assert r["response"] == tok.decode(body, skip_special_tokens=True)
  # A typo in an override fails on the locked config.
  bad = subprocess.run(cmd + ["--config.sampling.temprature=1.0"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "temprature" in bad.stderr


def _responses(workdir, label):
  with open(os.path.join(workdir, label, "synthetic", "responses.jsonl")) as f:
    return {(r["problem_id"], r["sample"]): r for r in map(json.loads, f)}


def _two_processes(cmd, check=True):
  """`cmd` as the 2 processes (2 fake CPU devices each) of one job; see launch_two."""
  from test_multihost import launch_two
  return launch_two([cmd, cmd], {**os.environ, "JAX_PLATFORMS": "cpu"}, REPO, timeout=300,
                    check=check)


@pytest.mark.slow
def test_two_processes_sample_what_one_device_does(model_dir, tmp_path):
  """The same responses, grades and summary from one device and from 2 processes of 2 devices
  each on a (data, fsdp, tensor) = 2 x 1 x 2 mesh: parameters split over tensor, rows over data,
  that is across the processes (the sampler alone is checked on 2 x 2 x 2 in test_sampling).
  The 2-process run is also resumed (2 problems, then 3): process 0 alone holds the responses
  file, and the other process must sample exactly the problems it says are left."""
  label = os.path.basename(model_dir)
  one = str(tmp_path / "one")
  ref = evaluate.run(_tiny_config(model_dir, max_problems=3), one)
  want = _responses(one, label)
  assert len(want) == 12

  two = str(tmp_path / "two")
  _two_processes(_cli(model_dir, two, 2, "--config.mesh.shape=(2,1,2)"))
  assert len(_responses(two, label)) == 8
  (out0, _), (out1, _) = _two_processes(_cli(model_dir, two, 3, "--config.mesh.shape=(2,1,2)"))
  assert "1/1 problems sampled (2 resumed)" in out0
  assert "[evaluate]" not in out1  # only process 0 grades and writes
  # An error that only process 0 can see (the responses were sampled at another temperature)
  # stops both processes, instead of leaving process 1 waiting for it.
  (rc0, _, err0), (rc1, _, err1) = _two_processes(_cli(
      model_dir, two, 3, "--config.mesh.shape=(2,1,2)", "--config.sampling.temperature=0.9"),
      check=False)
  assert rc0 != 0 and "sampled differently" in err0, err0[-2000:]
  assert rc1 != 0 and "failed on process 0" in err1, err1[-2000:]
  # Hosts that read different model files (a stale copy on one worker) are refused on both.
  other = make_model_dir(str(tmp_path / label), seed=1)  # same name, other weights
  from test_multihost import launch_two
  cmds = [_cli(path, str(tmp_path / "mixed"), 3, "--config.mesh.shape=(2,1,2)")
          for path in (model_dir, other)]
  results = launch_two(cmds, {**os.environ, "JAX_PLATFORMS": "cpu"}, REPO, timeout=300,
                       check=False)
  for rc, _, err in results:
    assert rc != 0 and "the model files of" in err and "differs between hosts" in err, err[-2000:]

  got = _responses(two, label)
  assert got.keys() == want.keys()
  for key, r in want.items():
    for field in ("tokens", "response", "reward", "length", "finished"):
      assert got[key][field] == r[field], (key, field)
  with open(os.path.join(two, "results.json")) as f:
    assert json.load(f)["models"][label]["benchmarks"] == ref["models"][label]["benchmarks"]


@pytest.mark.slow
def test_evaluate_resumes_without_resampling(model_dir, tmp_path, monkeypatch):
  from explore_jax import rewards
  from explore_jax import rollout as rollout_lib
  from explore_jax.data import templates

  class OddLengthGrader:
    """Varied outcomes (a random model is never right), to exercise pass@k."""

    def __init__(self, **kw):
      pass

    def score(self, responses, answers, method):
      assert method == "math_verify" and len(responses) == len(answers)
      return np.array([1.0 if len(r) % 2 else -1.0 for r in responses])

    def close(self):
      pass

  monkeypatch.setattr(rewards, "RewardPool", OddLengthGrader)
  prompts_seen, calls = [], []
  real_generate = rollout_lib.generate

  def counting_generate(config, params, prompt_tokens, prompt_mask, rng, **kw):
    calls.append(1)
    for row, m in zip(np.asarray(prompt_tokens), np.asarray(prompt_mask)):
      prompts_seen.append(bytes(row[m.astype(bool)].tolist()))
    return real_generate(config, params, prompt_tokens, prompt_mask, rng, **kw)

  monkeypatch.setattr(rollout_lib, "generate", counting_generate)
  workdir = str(tmp_path / "eval")
  label = os.path.basename(model_dir)
  evaluate.run(_tiny_config(model_dir, max_problems=2), workdir)
  assert len(calls) == 1 and len(set(prompts_seen)) == 2
  with open(os.path.join(workdir, label, "synthetic", "responses.jsonl")) as f:
    first = f.readlines()
  # The static engine draws the same responses.
  static = _tiny_config(model_dir, max_problems=2)
  static.engine = "static"
  evaluate.run(static, str(tmp_path / "static"))
  with open(os.path.join(tmp_path, "static", label, "synthetic", "responses.jsonl")) as f:
    assert [json.loads(r)["tokens"] for r in f] == [json.loads(r)["tokens"] for r in first]

  prompts_seen.clear()
  calls.clear()
  evaluate.run(_tiny_config(model_dir, max_problems=5), workdir)
  from explore_jax import data
  problems = list(data.load("synthetic_arithmetic", "test"))[:5]
  # Byte tokenizer: the prompt's token ids are its UTF-8 bytes.
  want = [templates.apply_template("synthetic", p["problem"]).encode() for p in problems[2:]]
  # Two calls (two problems each, the second padded with a copy), only the 3 new problems.
  assert len(calls) == 2 and sorted(set(prompts_seen)) == sorted(set(want)) and len(set(want)) == 3
  res, recs = _check_outputs(workdir, label, 4, 5)
  with open(os.path.join(workdir, label, "synthetic", "responses.jsonl")) as f:
    assert f.readlines()[:len(first)] == first
  assert 0 < res["avg@n"] < 1  # the stand-in grader gives mixed outcomes

  # Nothing left to do: a third run samples nothing.
  prompts_seen.clear()
  evaluate.run(_tiny_config(model_dir, max_problems=5), workdir)
  assert prompts_seen == []

  # Two models (here the same directory twice): a label each, one results entry and CSV rows each.
  c = _tiny_config(model_dir, max_problems=5)
  c.models = (model_dir,)
  res = evaluate.run(c, workdir)
  assert list(res["models"]) == [label, label + "_1"]
  # Same seed, same batches: the uninterrupted run reproduces the resumed one.
  assert res["models"][label] == res["models"][label + "_1"]
  with open(os.path.join(workdir, "per_problem.csv")) as f:
    assert [r["model"] for r in csv.DictReader(f)] == [label] * 5 + [label + "_1"] * 5


def test_resume_refuses_responses_sampled_differently(model_dir, tmp_path):
  """Responses are resumed only from the same model files and sampling settings: a retrained
  model, or another temperature, must not be scored with the old samples."""
  import shutil
  model = tmp_path / "model"
  shutil.copytree(model_dir, model)
  workdir = str(tmp_path / "eval")
  label = os.path.basename(str(model))
  evaluate.run(_tiny_config(str(model), max_problems=1), workdir)
  responses = os.path.join(workdir, label, "synthetic", "responses.jsonl")
  with open(responses) as f:
    before = f.read()
  other = _tiny_config(str(model), max_problems=1)
  other.sampling.temperature = other.sampling.temperature / 2
  with pytest.raises(ValueError, match=r"responses.jsonl was sampled differently \(sampling"):
    evaluate.run(other, workdir)
  # Touched but not changed (a copy, a move): still the same model.
  weights = next(model.glob("*.safetensors"))
  st = weights.stat()
  os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  evaluate.run(_tiny_config(str(model), max_problems=1), workdir)
  with open(responses) as f:
    assert f.read() == before
  # The model retrained in place (same path, other weights): its old responses are stale.
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(weights))
  name = sorted(tensors)[0]
  tensors[name] = tensors[name] + 1.0
  save_file(tensors, str(weights), metadata={"format": "pt"})
  with pytest.raises(ValueError, match="model_files"):
    evaluate.run(_tiny_config(str(model), max_problems=1), workdir)
  with open(responses) as f:
    assert f.read() == before  # nothing lost
  # ... unless the caller owns the workdir: the old responses are set aside, new ones sampled.
  owner = _tiny_config(str(model), max_problems=1)
  owner.on_changed_responses = "set_aside"
  evaluate.run(owner, workdir)
  with open(os.path.join(workdir, label, "synthetic", "responses.stale.jsonl")) as f:
    assert f.read() == before
  with open(responses) as f:
    assert len(f.readlines()) == 4  # one problem, n = 4, sampled from the new weights
  with open(os.path.join(workdir, label, "synthetic", "sampled_with.json")) as f:
    assert json.load(f)["model_files"] == evaluate.model_fingerprint(str(model))
  evaluate.run(_tiny_config(str(model), max_problems=1), workdir)  # now resumable as it is


def test_bad_config_errors(tmp_path):
  c = _tiny_config(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="missing"):
    evaluate.run(c, str(tmp_path / "w"))
  c.model = ""
  with pytest.raises(ValueError, match="no model"):
    evaluate.run(c, str(tmp_path / "w"))
