"""The JAX sampler against transformers' Qwen2 generate, the teacher-forced forward pass and
transformers' logits warpers (chi-square on many draws)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers

from explore_jax import rollout as rollout_lib
from explore_jax.models import checkpoint, qwen2
from explore_jax.rollout import sampling
import fake_devices

VOCAB, PAD = 97, 0
_forward = jax.jit(qwen2.forward, static_argnums=2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hf_config(**kw):
  base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
              pad_token_id=PAD, initializer_range=0.2)
  base.update(kw)
  return transformers.Qwen2Config(**base)


def _randomise(hf):
  # Biases and norm weights initialise to 0 / 1; randomise them so that the parity is meaningful.
  # (With initializer_range 0.2 the greedy continuations vary; at 0.02 they repeat one token.)
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if name.endswith("bias"):
        p.copy_(torch.randn_like(p) * 0.2)
      elif "norm" in name:
        p.copy_(1.0 + torch.randn_like(p) * 0.3)
  return hf


@pytest.fixture(scope="module")
def model():
  torch.manual_seed(0)
  hcfg = _hf_config()
  hf = _randomise(transformers.Qwen2ForCausalLM(hcfg).float().eval())
  cfg, params = checkpoint.from_hf_model(hf)
  return hf, cfg, jax.tree.map(jnp.asarray, params)


def _prompts(lengths, width, seed=0):
  rng = np.random.default_rng(seed)
  tokens = np.full((len(lengths), width), PAD, np.int32)
  mask = np.zeros((len(lengths), width), np.int32)
  for row, n in enumerate(lengths):
    tokens[row, width - n:] = rng.integers(3, VOCAB, n)
    mask[row, width - n:] = 1
  return tokens, mask


def _hf_greedy(hf, tokens, mask, max_new, eos):
  out = hf.generate(input_ids=torch.tensor(tokens).long(), attention_mask=torch.tensor(mask).long(),
                    do_sample=False, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=PAD)
  return out[:, tokens.shape[1]:].numpy()


def test_greedy_matches_transformers_left_padded(model):
  hf, cfg, params = model
  tokens, mask = _prompts([5, 9, 3, 7, 1], 9)
  n_new = 16
  greedy = lambda eos, n=1: rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(0),
                                                 max_new_tokens=n_new, temperature=0.0, eos_id=eos,
                                                 n=n)
  # The greedy path before an EOS does not depend on eos_id: make row 0's 4th token the EOS, so
  # both finish reasons occur.
  eos = int(greedy(VOCAB - 1).tokens[0, 3])
  ours = greedy(eos)
  ref = _hf_greedy(hf, tokens, mask, n_new, eos)
  ours_tokens, lengths = np.asarray(ours.tokens), np.asarray(ours.lengths)
  for row in range(len(tokens)):
    hits = np.nonzero(ref[row] == eos)[0]
    ref_len = int(hits[0]) + 1 if hits.size else n_new
    assert lengths[row] == ref_len, row
    np.testing.assert_array_equal(ours_tokens[row, :ref_len], ref[row, :ref_len], err_msg=str(row))
    assert ours.finish_reason[row] == (sampling.FINISH_EOS if hits.size else sampling.FINISH_LENGTH)
  assert lengths[0] <= 4 and (lengths == n_new).any()
  # n copies of a greedy rollout sit in consecutive rows, prompt-major.
  twice = greedy(eos, n=2)
  np.testing.assert_array_equal(np.asarray(twice.tokens), np.repeat(ours_tokens, 2, axis=0))
  np.testing.assert_array_equal(np.asarray(twice.prompt_tokens), np.repeat(tokens, 2, axis=0))


def test_cached_decode_logits_equal_full_forward(model):
  _, cfg, params = model
  tokens, mask = _prompts([6, 2, 8], 8, seed=1)
  cont = np.random.default_rng(2).integers(3, VOCAB, (3, 10)).astype(np.int32)
  full_tokens = np.concatenate([tokens, cont], axis=1)
  full_mask = np.concatenate([mask, np.ones_like(cont)], axis=1)
  ref = np.asarray(_forward(params, full_tokens, cfg, full_mask))  # [B, P + T, V]

  cache = qwen2.init_cache(cfg, 3, full_tokens.shape[1])
  logits, cache = jax.jit(qwen2.apply_with_cache, static_argnums=5)(
      params, tokens, qwen2.positions_from_mask(mask), mask, cache, cfg)
  step = jax.jit(sampling.decode_logits, static_argnums=1)
  got = [np.asarray(logits[:, -1])]
  positions = mask.sum(-1)
  for t in range(cont.shape[1] - 1):
    logits, cache = step(params, cfg, cache, cont[:, t], positions + t)
    got.append(np.asarray(logits))
  got = np.stack(got, axis=1)  # [B, T, V]
  np.testing.assert_allclose(got, ref[:, 7:-1], atol=1e-4, rtol=1e-4)


def test_logprobs_entropy_mask_match_teacher_forcing(model):
  _, cfg, params = model
  tokens, mask = _prompts([4, 7, 2], 7, seed=3)
  n_new, eos = 12, 5
  r = rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(7), max_new_tokens=n_new,
                           temperature=1.3, top_p=0.9, eos_id=eos, n=3)
  out, lengths = np.asarray(r.tokens), np.asarray(r.lengths)
  full = np.concatenate([np.asarray(r.prompt_tokens), out], axis=1)
  full_mask = np.concatenate([np.asarray(r.prompt_mask), np.asarray(r.mask)], axis=1)
  logits = _forward(params, full, cfg, full_mask)[:, tokens.shape[1] - 1:-1]  # [R, N, V]
  logp = jax.nn.log_softmax(logits, axis=-1)
  ref_logp = np.take_along_axis(np.asarray(logp), out[..., None], axis=-1)[..., 0]
  ref_ent = np.asarray(-jnp.sum(jnp.exp(logp) * logp, axis=-1))
  m = np.asarray(r.mask).astype(bool)
  np.testing.assert_allclose(np.asarray(r.logprobs)[m], ref_logp[m], atol=1e-4)
  np.testing.assert_allclose(np.asarray(r.entropy)[m], ref_ent[m], atol=1e-4)
  assert np.all(np.asarray(r.logprobs)[~m] == 0) and np.all(np.asarray(r.entropy)[~m] == 0)

  # EOS bookkeeping, row by row against a Python loop.
  for row in range(out.shape[0]):
    hits = np.nonzero(out[row] == eos)[0]
    length = int(hits[0]) + 1 if hits.size else n_new
    assert lengths[row] == length
    np.testing.assert_array_equal(m[row], np.arange(n_new) < length)
    assert np.all(out[row, length:] == eos)
    assert r.finish_reason[row] == (sampling.FINISH_EOS if hits.size else sampling.FINISH_LENGTH)
  assert (np.asarray(r.finish_reason) == sampling.FINISH_EOS).any()

  # One loop over the whole cache instead of segments over a growing view: the same rollout.
  one = rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(7), max_new_tokens=n_new,
                             temperature=1.3, top_p=0.9, eos_id=eos, n=3, segments=1)
  np.testing.assert_array_equal(np.asarray(one.tokens), out)
  np.testing.assert_allclose(np.asarray(one.logprobs), np.asarray(r.logprobs), atol=1e-5)


def test_same_rng_same_rollout_rows_differ(model):
  _, cfg, params = model
  tokens, mask = _prompts([5, 3], 5, seed=4)
  run = lambda key: rollout_lib.generate(cfg, params, tokens, mask, key, max_new_tokens=8,
                                         temperature=1.0, top_k=20, eos_id=VOCAB - 1, n=4)
  a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
  rows = {tuple(x) for x in np.asarray(a.tokens)}
  assert len(rows) == 8  # the 4 samples of each prompt all differ


def _warped_probs(logits, temperature, top_k, top_p):
  """Reference: transformers' own warpers, in the order generate applies them."""
  scores = torch.tensor(logits)[None]
  warpers = [transformers.TemperatureLogitsWarper(temperature)]
  if top_k:
    warpers.append(transformers.TopKLogitsWarper(top_k))
  if top_p < 1:
    warpers.append(transformers.TopPLogitsWarper(top_p))
  for w in warpers:
    scores = w(None, scores)
  return torch.softmax(scores, -1)[0].double().numpy()


@pytest.mark.parametrize("vocab,peaked,temperature,top_k,top_p,small_limits", [
    (10, False, 0.7, 0, 1.0, False),
    (10, False, 1.0, 4, 1.0, False),
    (10, False, 1.5, 0, 0.8, False),
    (10, False, 0.9, 6, 0.7, False),
    (300, True, 1.0, 0, 0.9, True),  # the nucleus lies within the top-64 candidates
    (300, False, 1.0, 0, 0.6, True),  # it does not: bisection threshold, then a blocked draw
    (300, False, 1.0, 0, 0.6, False),  # bisection threshold directly, plain draw
    (300, True, 0.8, 0, 1.0, True),  # plain temperature, blocked draw
])
def test_sampling_distribution_chi_square(monkeypatch, vocab, peaked, temperature, top_k, top_p,
                                          small_limits):
  # Small limits send a 300-token vocabulary down the paths meant for large ones.
  monkeypatch.setattr(sampling, "_BLOCKED_MIN_VOCAB", 100 if small_limits else 10**9)
  monkeypatch.setattr(sampling, "_CANDIDATES_MIN_VOCAB", 100 if small_limits else 10**9)
  rng = np.random.default_rng(vocab + top_k)
  logits = rng.normal(size=vocab).astype(np.float32) * (4.0 if peaked else 1.0)
  expected = _warped_probs(logits, temperature, top_k, top_p)
  draws = 40_000
  sampler = sampling.Sampler(temperature, top_k, top_p)
  # A fresh lambda: jit must not reuse a trace made under other limits.
  tokens = jax.jit(lambda x, key: sampler.next_token(x, jax.random.split(key, draws)))(
      jnp.broadcast_to(logits, (draws, vocab)), jax.random.key(0))
  counts = np.bincount(np.asarray(tokens), minlength=vocab)
  support = expected > 0
  assert counts[~support].sum() == 0  # nothing outside the truncated support
  assert 1 < support.sum() < vocab or (top_k == 0 and top_p == 1)
  # Pool rare tokens so every cell expects >= 5 draws.
  order = np.argsort(-expected[support])
  exp_s, cnt_s = expected[support][order] * draws, counts[support][order]
  big = exp_s >= 5
  f_exp = np.append(exp_s[big], exp_s[~big].sum()) if (~big).any() else exp_s
  f_obs = np.append(cnt_s[big], cnt_s[~big].sum()) if (~big).any() else cnt_s
  assert scipy.stats.chisquare(f_obs, f_exp * draws / f_exp.sum()).pvalue > 1e-3


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (5, 1.0)])
def test_row_tokens_do_not_depend_on_batch_mates(monkeypatch, top_k, top_p):
  # A 300-token vocabulary down the large-vocabulary paths: blocked draws, and top-p's choice
  # between candidates and threshold, which a peaked row and a flat row take differently.
  monkeypatch.setattr(sampling, "_BLOCKED_MIN_VOCAB", 100)
  monkeypatch.setattr(sampling, "_CANDIDATES_MIN_VOCAB", 100)
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 300)).astype(np.float32) * np.array([[8.0], [0.5]] * 3)
  keys = jax.random.split(jax.random.key(3), 6)
  sampler = sampling.Sampler(1.0, top_k, top_p)
  draw = jax.jit(lambda x, k: sampler.next_token(x, k))
  full = np.asarray(draw(logits, keys))
  for rows in ([0, 2, 4], [1], [5, 0], [3, 1, 4, 2]):
    np.testing.assert_array_equal(np.asarray(draw(logits[rows], keys[np.array(rows)])),
                                  full[rows], err_msg=str(rows))
  # Other keys give other tokens (the draw is not just an argmax).
  assert not np.array_equal(np.asarray(draw(logits, jax.random.split(jax.random.key(4), 6))),
                            full) or top_k == 1


def test_top_p_threshold_equals_sorted_rule():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(64, 500)) * rng.uniform(0.2, 5.0, size=(64, 1))
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))
  for top_p in (0.3, 0.9, 0.99):
    got = probs >= np.asarray(sampling._top_p_threshold(jnp.asarray(probs), top_p))
    order = np.argsort(-probs, axis=-1)
    sorted_p = np.take_along_axis(probs.astype(np.float64), order, axis=-1)
    above = np.cumsum(sorted_p, axis=-1) - sorted_p  # the mass of the tokens before each
    keep_sorted = above < top_p
    want = np.zeros_like(got)
    np.put_along_axis(want, order, keep_sorted, axis=-1)
    # A token whose mass above lies within float32 summation error of top_p may go either way
    # (the order of XLA's sum depends on the CPU's vector width); every other must match.
    tie = np.zeros_like(got)
    np.put_along_axis(tie, order, np.abs(above - top_p) < 1e-5, axis=-1)
    assert tie.mean() < 1e-3  # a handful of the 32,000 entries (tail tokens at top_p 0.99)
    np.testing.assert_array_equal(got[~tie], want[~tie])


def test_greedy_sampler_is_argmax():
  logits = jnp.asarray([[0.1, 3.0, 3.0, -1.0], [5.0, 0.0, 0.0, 0.0]])
  np.testing.assert_array_equal(sampling.Sampler(0.0).next_token(logits, jax.random.key(0)),
                                [1, 0])


def test_bad_input_errors(model):
  _, cfg, params = model
  tokens, mask = _prompts([3, 2], 3)
  with pytest.raises(ValueError, match="not left-padded"):
    rollout_lib.generate(cfg, params, tokens, mask[:, ::-1], jax.random.key(0), max_new_tokens=2,
                         eos_id=2)
  with pytest.raises(ValueError, match="top_p"):
    rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(0), max_new_tokens=2, eos_id=2,
                         top_p=0.0)
  with pytest.raises(ValueError, match="eos_id"):
    rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(0), max_new_tokens=2,
                         eos_id=VOCAB)


_MESH_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from explore_jax import rollout as rollout_lib
    from explore_jax.rollout import sampling
    from explore_jax.tpu import sharding
    from explore_jax.models import qwen2
    cfg = qwen2.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            rope_theta=1e4)
    params = qwen2.init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda x: x * 3, params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 128, (4, 6)).astype(np.int32)
    mask = (np.arange(6)[None] >= np.array([0, 3, 1, 5])[:, None]).astype(np.int32)
    kw = dict(max_new_tokens=10, eos_id=2, n=2)
    ref_g = rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(1), temperature=0.0, **kw)
    ref_s = rollout_lib.generate(cfg, params, tokens, mask, jax.random.key(1), top_p=0.9, **kw)
    mesh = sharding.make_mesh((2, 2, 2))
    sh = sharding.logical_to_mesh(qwen2.logical_axes(cfg), params, mesh)
    params_m = jax.device_put(params, sh)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    tokens_m, mask_m = jax.device_put(tokens, batch), jax.device_put(mask, batch)
    got_g = rollout_lib.generate(cfg, params_m, tokens_m, mask_m, jax.random.key(1), temperature=0.0,
                                 mesh=mesh, **kw)
    got_s = rollout_lib.generate(cfg, params_m, tokens_m, mask_m, jax.random.key(1), top_p=0.9,
                                 mesh=mesh, **kw)
    assert len(got_g.tokens.sharding.device_set) == 8, got_g.tokens.sharding
    np.testing.assert_array_equal(np.asarray(got_g.tokens), np.asarray(ref_g.tokens))
    np.testing.assert_array_equal(np.asarray(got_g.lengths), np.asarray(ref_g.lengths))
    np.testing.assert_allclose(np.asarray(got_g.logprobs), np.asarray(ref_g.logprobs), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(got_s.tokens), np.asarray(ref_s.tokens))
    print("MESH_OK", got_g.tokens.sharding.spec)
""")


@pytest.mark.slow
def test_mesh_greedy_equals_single_device():
  fake_devices.run_script(_MESH_SCRIPT, timeout=300, expect="MESH_OK")


def test_generate_cli(tmp_path, model):
  import tokenizers
  words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                          unk_token="<pad>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                              bos_token="<s>", eos_token="</s>")
  hf, _, _ = model
  hf.save_pretrained(tmp_path / "model")
  # A separate directory: next to a Qwen2 config.json, AutoTokenizer would build a Qwen2Tokenizer.
  fast.save_pretrained(tmp_path / "tok")
  prompts = ["w5 w9 w13", "w40"]
  proc = subprocess.run(
      [sys.executable, "-m", "explore_jax.generate", "--model", str(tmp_path / "model"),
       "--tokenizer", str(tmp_path / "tok"), "--n", "2",
       "--temperature", "0", "--max_new_tokens", "6"] + sum([["--prompt", p] for p in prompts],
                                                             []),
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  tokens, mask = _prompts([3, 1], 3)
  for row, p in enumerate(prompts):
    ids = fast(p, add_special_tokens=False)["input_ids"]
    tokens[row, 3 - len(ids):] = ids
  ref = _hf_greedy(hf, tokens, mask, 6, 2)
  blocks = proc.stdout.split("=== prompt ")[1:]
  assert len(blocks) == 4, proc.stdout
  for row, block in enumerate(blocks):
    header, text = block.split("\n")[:2]
    assert header.startswith(f"{row // 2} sample {row % 2} ")
    ids = ref[row // 2].tolist()
    ids = ids[:ids.index(2)] if 2 in ids else ids
    assert text == fast.decode(ids) and len(set(ids)) > 1, (text, ids)
