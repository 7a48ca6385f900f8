"""Datasets, user files, prompt templates, the tiny tokenizer and the grain prompt pipeline."""

import json
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers

from explore_jax import data, paths
from explore_jax.data import builders, pipeline, synthetic, templates
from explore_jax.data import tokenizer as tokenizer_lib

SHARED = paths.default_data_dir()
COUNTS = {("math500", "test"): 500, ("aime24", "test"): 30, ("aime25", "test"): 30,
          ("amc23", "test"): 40, ("dapo_math_17k", "train"): 17917, ("gsm8k", "train"): 7473,
          ("gsm8k", "test"): 1319}


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line, strict=False) for line in f if line.strip()]


@pytest.mark.parametrize("name,split", sorted(COUNTS))
def test_counts_and_schema(name, split):
  recs = data.load(name, split)
  assert len(recs) == COUNTS[(name, split)]
  assert not recs.skipped
  for r in recs[:50] + recs[-50:]:
    assert r["problem"].strip() and r["answer"].strip() and r["id"]
  assert len({r["id"] for r in recs}) == len(recs)


def test_records_equal_source_rows():
  # Source order is kept, and each answer is the source field, normalised as documented.
  raw = _jsonl(os.path.join(SHARED, "aime24/test.jsonl"))
  recs = data.load("aime24", "test")
  assert [r["answer"] for r in recs] == [str(int(x["answer"])) for x in raw]
  assert [r["problem"] for r in recs] == [x["problem"] for x in raw]
  raw = _jsonl(os.path.join(SHARED, "amc23/test.jsonl"))
  assert [r["answer"] for r in data.load("amc23", "test")] == [str(int(x["answer"])) for x in raw]
  raw = _jsonl(os.path.join(SHARED, "gsm8k/test.jsonl"))
  gsm = data.load("gsm8k", "test")
  assert [r["answer"] for r in gsm] == [
      x["answer"].split("####")[-1].strip().replace(",", "") for x in raw]
  assert gsm[0]["problem"] == raw[0]["question"]
  table = pq.read_table(os.path.join(SHARED, "dapo_math_17k/train.parquet")).slice(0, 3)
  dapo = data.load("dapo_math_17k", "train")
  for row, rec in zip(table.to_pylist(), dapo[:3]):
    assert rec["problem"] == row["prompt"][0]["content"]
    assert rec["answer"] == row["reward_model"]["ground_truth"]
  m = data.load("math500", "test")[0]
  assert m["level"] in range(1, 6) and m["subject"] and m["solution"]


def test_second_load_reads_the_cache(monkeypatch):
  data.load("aime25", "test")
  def fail(*a, **k):
    raise AssertionError("rebuilt a prepared dataset")
  monkeypatch.setattr(builders.LocalFileBuilder, "download_and_prepare", fail)
  assert len(data.load("aime25", "test")) == 30


def test_data_dir_override_and_errors(tmp_path, monkeypatch):
  monkeypatch.setenv("EXPLORE_JAX_CACHE", str(tmp_path / "cache"))
  src = tmp_path / "src"
  os.makedirs(src / "aime25")
  with open(src / "aime25/test.jsonl", "w") as f:
    f.write(json.dumps({"question": "What is 1+1?", "answer": "002"}) + "\n")
  recs = data.load("aime25", "test", data_dir=str(src))
  assert [(r["problem"], r["answer"]) for r in recs] == [("What is 1+1?", "2")]
  assert os.path.isdir(tmp_path / "cache" / "tfds")
  with pytest.raises(FileNotFoundError, match="aime24/test.jsonl"):
    data.load("aime24", "test", data_dir=str(src))
  with pytest.raises(ValueError, match="no split 'train'"):
    data.load("aime25", "train")
  with pytest.raises(ValueError, match="unknown dataset"):
    data.load("aime26", "test")


def test_user_jsonl_with_malformed_rows(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv("EXPLORE_JAX_CACHE", str(tmp_path / "cache"))
  path = tmp_path / "mine.jsonl"
  lines = [json.dumps({"q": "1+1?", "a": 2, "k": "x"}),
           '{"q": "broken json", ',
           json.dumps({"q": "no answer"}),
           "",
           json.dumps({"q": "", "a": "3"}),
           json.dumps({"q": "2+2?", "a": "4", "k": "y"})]
  path.write_text("\n".join(lines) + "\n")
  with caplog.at_level(logging.WARNING):
    recs = data.load_file(str(path), problem_field="q", answer_field="a", id_field="k")
  assert [(r["id"], r["problem"], r["answer"], r["line"]) for r in recs] == [
      ("x", "1+1?", "2", 1), ("y", "2+2?", "4", 6)]
  assert [s.line for s in recs.skipped] == [2, 3, 5]
  assert "not valid JSON" in recs.skipped[0].reason and "'a'" in recs.skipped[1].reason
  for line in (2, 3, 5):
    assert f"{path}:{line}:" in caplog.text
  # An edited file is rebuilt, not served stale.
  path.write_text(lines[0] + "\n")
  assert len(data.load_file(str(path), problem_field="q", answer_field="a")) == 1


def test_user_parquet_with_dotted_fields(tmp_path, monkeypatch):
  monkeypatch.setenv("EXPLORE_JAX_CACHE", str(tmp_path / "cache"))
  rows = [{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "P1"}],
           "reward_model": {"ground_truth": "7"}},
          {"prompt": [{"role": "user", "content": "P2"}], "reward_model": {"ground_truth": ""}}]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mine.parquet")
  recs = data.load_file(str(tmp_path / "mine.parquet"), problem_field="prompt",
                        answer_field="reward_model.ground_truth")
  assert [(r["problem"], r["answer"]) for r in recs] == [("P1", "7")]
  assert [s.line for s in recs.skipped] == [2]
  with pytest.raises(ValueError, match="unknown file format"):
    data.load_file(str(tmp_path / "mine.csv"))


def test_the_same_file_at_another_path_loads(tmp_path, monkeypatch):
  """Two copies of one file (same bytes, two paths) are two builds in the same cache: the second
  once found the first's build and read a split it did not hold."""
  monkeypatch.setenv("EXPLORE_JAX_CACHE", str(tmp_path / "cache"))
  for folder in ("a", "b"):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "p.jsonl").write_text('{"q": "1+1", "a": "2"}\n{"q": "2+2", "a": "4"}\n')
    recs = data.load_file(str(tmp_path / folder / "p.jsonl"), problem_field="q", answer_field="a")
    assert [r["answer"] for r in recs] == ["2", "4"]


def test_synthetic_through_load():
  recs = data.load("synthetic_arithmetic", "test")
  assert len(recs) == synthetic.ArithmeticConfig().test_size
  assert recs[0] == synthetic.generate("test", 1)[0]


def test_templates(tmp_path):
  p = "What is 1+1?"
  assert templates.apply_template("qwen_math", p) == (
      "What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}.")
  assert templates.apply_template("dapo", p) == (
      "Solve the following math problem step by step. The last line of your response should be "
      "of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem."
      "\n\nWhat is 1+1?\n\nRemember to put your answer on its own line after \"Answer:\".")
  assert templates.apply_template("synthetic", p) == p + "\n"
  tok = tokenizer_lib.build_tiny_tokenizer(str(tmp_path / "tok"))
  assert templates.apply_template("chat:plain", p, tok) == (
      "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n")
  assert templates.apply_template("chat", p, tok).startswith(
      "<|im_start|>user\nWhat is 1+1?\nPlease reason")
  assert templates.reward_method("chat:dapo") == "dapo"
  with pytest.raises(ValueError, match="needs a tokenizer"):
    templates.apply_template("chat", p)
  with pytest.raises(ValueError, match="unknown prompt template"):
    templates.apply_template("qwen", p)


def test_tiny_tokenizer_round_trip(tmp_path):
  tokenizer_lib.build_tiny_tokenizer(str(tmp_path / "tok"))
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
  assert len(tok) <= 512
  assert tok.eos_token == tok.pad_token == "<|endoftext|>"
  ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  assert len(set(ids)) == 3 and all(i < len(tok) for i in ids)
  texts = [templates.apply_template("synthetic", r["problem"]) + r["solution"]
           for r in synthetic.generate("test", 300)]
  texts += ["héllo ∑ 日本 \\boxed{x}\n\t", templates.apply_template("dapo", "Let $x=1$.")]
  for text in texts:
    assert tok.decode(tok.encode(text)) == text
  # digits are single tokens, so "12" + "3" never merge into one
  assert tok.tokenize("123") == ["1", "2", "3"]
  assert tok.encode("<|im_start|>") == [ids[1]]


def _ids(batches):
  return [r["id"] for b in batches for r in b]


def test_pipeline_restore_is_exact():
  recs = synthetic.generate("test", 50)
  it = pipeline.prompt_batches(recs, batch_size=8, seed=3)
  for _ in range(4):  # mid-epoch (50 records, 32 seen)
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(20)]
  restored = pipeline.prompt_batches(recs, batch_size=8, seed=3)
  restored.set_state(state)
  assert [next(restored) for _ in range(20)] == expected
  with pytest.raises(ValueError, match="another pipeline"):
    pipeline.prompt_batches(recs, batch_size=8, seed=4).set_state(state)


def test_pipeline_epochs_are_permutations_and_reshuffled():
  recs = synthetic.generate("test", 40)
  it = pipeline.prompt_batches(recs, batch_size=10, seed=0)
  ids = _ids([next(it) for _ in range(8)])
  first, second = ids[:40], ids[40:]
  assert sorted(first) == sorted(second) == sorted(r["id"] for r in recs)
  assert first != second and first != [r["id"] for r in recs]
  other = pipeline.prompt_batches(recs, batch_size=10, seed=1)
  assert _ids([next(other) for _ in range(4)]) != first


def test_pipeline_shards_are_disjoint_and_cover():
  recs = synthetic.generate("test", 43)
  seen = []
  for shard in range(4):
    it = pipeline.prompt_batches(recs, batch_size=1, seed=0, shard_index=shard, shard_count=4)
    n = len(range(shard, 43, 4))
    seen.append(set(_ids([next(it) for _ in range(n)])))
  assert sum(len(s) for s in seen) == 43 and set().union(*seen) == {r["id"] for r in recs}
  with pytest.raises(ValueError, match="shard_index"):
    pipeline.prompt_batches(recs, 1, 0, shard_index=4, shard_count=4)


def test_pipeline_over_loaded_records():
  recs = data.load("aime24", "test")
  it = pipeline.prompt_batches(recs, batch_size=7, seed=0)
  batch = next(it)
  assert len(batch) == 7 and all(isinstance(r["problem"], str) for r in batch)


@pytest.mark.parametrize("content, words", [
    (b"", ["no records (the file is empty or blank)"]),
    (b"\n  \n", ["no records (the file is empty or blank)"]),
    (b'{"q": "no answer"}\n[1, 2]\n{"q": \n',
     ["no usable rows: 3 records read, 3 skipped", ":1: missing field 'a'",
      ":2: record is a list, not an object", ":3: not valid JSON"]),
    ('{"q": "1+1?", "a": "2"}\n'.encode("utf-16"),
     ["encoded as UTF-16-LE", "save the file as UTF-8"]),
    ('{"q": "1+1?", "a": "2"}\n'.encode("utf-16-be"), ["encoded as UTF-16 or UTF-32 (NUL bytes"]),
])
def test_a_file_without_usable_rows_says_why(tmp_path, monkeypatch, content, words):
  """Once a TFDS AssertionError ("No examples were yielded") naming no file, the reasons for
  each skipped row never printed."""
  monkeypatch.setenv("EXPLORE_JAX_CACHE", str(tmp_path / "cache"))
  path = tmp_path / "mine.jsonl"
  path.write_bytes(content)
  with pytest.raises(ValueError) as e:
    data.load_file(str(path), problem_field="q", answer_field="a")
  assert str(path) in str(e.value)
  for w in words:
    assert w in str(e.value), str(e.value)


def test_invalid_utf8_is_kept_with_a_warning_and_duplicate_ids_are_refused(tmp_path, monkeypatch,
                                                                           caplog):
  monkeypatch.setenv("EXPLORE_JAX_CACHE", str(tmp_path / "cache"))
  path = tmp_path / "mine.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + b'{"k": "a", "q": "1+1?", "a": "2"}\n'  # a UTF-8 BOM: fine
                   b'{"k": "b", "q": "caf\xe9?", "a": "3"}\n'  # Latin-1 inside UTF-8
                   b'{"k": "a", "q": "2+2?", "a": "4"}\n')
  with caplog.at_level(logging.WARNING):
    recs = data.load_file(str(path), problem_field="q", answer_field="a", id_field="k")
  assert [(r["id"], r["problem"]) for r in recs] == [("a", "1+1?"), ("b", "caf\ufffd?")]
  assert [(s.line, s.reason) for s in recs.notes] == [
      (2, "invalid UTF-8 (byte 20 of the line, 0xe9) read as U+FFFD")]
  assert f"kept a changed row {path}:2: invalid UTF-8" in caplog.text
  assert [(s.line, s.reason.split(";")[0]) for s in recs.skipped] == [
      (3, "duplicate id 'a' (first at line 1)")]
  assert f"{path}:3: duplicate id 'a'" in caplog.text
  # The notes are kept with the prepared files: a second load warns the same.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert len(data.load_file(str(path), problem_field="q", answer_field="a", id_field="k")) == 2
  assert f"kept a changed row {path}:2" in caplog.text


def test_a_garbled_tokenizer_names_its_directory(tmp_path):
  tokenizer_lib.build_tiny_tokenizer(str(tmp_path / "tok"), num_examples=200)
  assert tokenizer_lib.load(str(tmp_path / "tok"))("1 + 2")["input_ids"]
  (tmp_path / "tok" / "tokenizer.json").write_text('{"garbled')
  with pytest.raises(ValueError, match=f"{tmp_path / 'tok'}: the tokenizer files could not be "
                                       "read"):
    tokenizer_lib.load(str(tmp_path / "tok"))
