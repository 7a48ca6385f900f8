"""Hugging Face safetensors <-> explore_jax parameter pytree, and orbax save/restore.

The whole mapping is `_hf_layout`: one entry per Hugging Face tensor name, giving the pytree path
and the reshape between the torch layout ([out, in] Linear weights, flat heads) and ours
([in, out] kernels, per-head projections). Only safetensors are read (never pickle) and nothing in a
checkpoint directory is executed.

Streaming: `load_hf` first checks every file header against the layout (names, shapes), so a bad
checkpoint fails before any weight is read; then it reads one tensor at a time, converts it and puts
it on its devices (`jax.make_array_from_callback` when a target sharding is given, so each device
receives only its slice) before reading the next. The host never holds more than one tensor beyond
the finished parameters. `save_hf` writes shard by shard in the same spirit, to a local directory
or a bucket (gs://, through etils.epath); with several processes each tensor is gathered from its
shards on every host and process 0 writes.

Directory formats:
  HF:    config.json, generation_config.json, model.safetensors | model-0000i-of-0000n.safetensors
         + model.safetensors.index.json, tokenizer files.
  orbax: explore_jax_model.json ({"config": Qwen2Config fields, "critic": bool}), params/ (an orbax
         StandardCheckpointer directory), tokenizer files when known.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_bytes

from explore_jax.config.cli import UserError
from explore_jax.models import qwen2
from explore_jax.models.qwen2 import Qwen2Config
from explore_jax.tpu import sharding

Params = dict[str, Any]


def _hf_layout(config: Qwen2Config) -> dict[str, tuple[tuple[str, ...], tuple[int, ...],
                                                        Callable, Callable]]:
  """HF name -> (pytree path, HF shape, to_jax(np) , to_hf(np))."""
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  n, k, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim
  ident = lambda x: x
  transpose = lambda x: np.ascontiguousarray(x.T)

  def heads_in(heads):  # [heads*H, D] -> [D, heads, H]
    return lambda x: np.ascontiguousarray(x.T).reshape(d, heads, h)

  def heads_in_back(heads):
    return lambda x: np.ascontiguousarray(x.reshape(d, heads * h).T)

  layout = {"model.embed_tokens.weight": (("model", "embed_tokens"), (v, d), ident, ident),
            "model.norm.weight": (("model", "norm", "weight"), (d,), ident, ident)}
  if not config.tie_word_embeddings:
    layout["lm_head.weight"] = (("lm_head",), (v, d), transpose, transpose)
  for i in range(config.num_hidden_layers):
    pre, path = f"model.layers.{i}.", ("model", f"layers_{i}")
    for name, heads in (("q", n), ("k", k), ("v", k)):
      layout[f"{pre}self_attn.{name}_proj.weight"] = (
          path + ("self_attn", f"{name}_proj"), (heads * h, d), heads_in(heads),
          heads_in_back(heads))
      layout[f"{pre}self_attn.{name}_proj.bias"] = (
          path + ("self_attn", f"{name}_bias"), (heads * h,),
          lambda x, heads=heads: x.reshape(heads, h), lambda x, heads=heads: x.reshape(heads * h))
    layout[pre + "self_attn.o_proj.weight"] = (
        path + ("self_attn", "o_proj"), (d, n * h),
        lambda x: np.ascontiguousarray(x.T).reshape(n, h, d),
        lambda x: np.ascontiguousarray(x.reshape(n * h, d).T))
    for name, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
      layout[f"{pre}mlp.{name}.weight"] = (path + ("mlp", name), shape, transpose, transpose)
    for name in ("input_layernorm", "post_attention_layernorm"):
      layout[f"{pre}{name}.weight"] = (path + (name, "weight"), (d,), ident, ident)
  return layout


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get_path(tree: dict, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def params_from_hf_state(state: dict[str, np.ndarray], config: Qwen2Config) -> Params:
  """Convert an in-memory HF state dict (numpy arrays) into the params pytree."""
  params: Params = {}
  for name, (path, _, to_jax, _) in _hf_layout(config).items():
    _set_path(params, path, to_jax(np.asarray(state[name])))
  return params


def from_hf_model(model) -> tuple[Qwen2Config, Params]:
  """(config, numpy params) of an in-memory transformers Qwen2ForCausalLM (torch, float32)."""
  config = Qwen2Config.from_hf_dict(model.config.to_dict())
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return config, params_from_hf_state(state, config)


def hf_state_from_params(params: Params, config: Qwen2Config) -> dict[str, np.ndarray]:
  return {name: to_hf(np.asarray(_get_path(params, path)))
          for name, (path, _, _, to_hf) in _hf_layout(config).items()}


# --------------------------------------------------------------------------------------------------
# Reading a Hugging Face directory
# --------------------------------------------------------------------------------------------------

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


class NoTokenizer(UserError, FileNotFoundError):
  """A directory given as a tokenizer holds none."""


def check_tokenizer_dir(path: str, what: str) -> None:
  """Raise NoTokenizer unless `path` holds a Hugging Face tokenizer (what
  `transformers.AutoTokenizer.from_pretrained` reads: tokenizer.json, or vocab.json + merges.txt
  / tokenizer.model, beside tokenizer_config.json); `what` names the config key or flag."""
  present = {fn for fn in TOKENIZER_FILES if os.path.exists(os.path.join(path, fn))}
  if present & {"tokenizer.json", "vocab.json", "tokenizer.model"}:
    return
  raise NoTokenizer(f"{what}: {path} holds no Hugging Face tokenizer (tokenizer.json, or "
                    "vocab.json + merges.txt, beside tokenizer_config.json); give the tokenizer's "
                    "directory or hub id separately (the trainer's config.model.tokenizer, the "
                    "CLIs' --tokenizer)")
# Tensors some exporters write that carry no information for us: the rotary frequency buffer
# (recomputed from rope_theta) and a duplicated lm_head of a tied model.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@contextlib.contextmanager
def _open_weights(full: str):
  """safe_open(full), whose errors (a truncated or garbled file) name the file: safetensors'
  own ("incomplete metadata, file not fully covered") do not."""
  try:
    with safe_open(full, "np") as f:
      yield f
  except SafetensorError as e:
    size = os.path.getsize(full) if os.path.exists(full) else 0
    raise ValueError(f"{full}: not a readable safetensors file ({size:,} bytes; {e}); it may be "
                     "truncated or corrupt: copy or download it again") from None


def _weight_files(path: str) -> dict[str, str]:
  """HF tensor name -> safetensors file, from the index or the single file's header."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      try:
        weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{index}: not a safetensors index ({e!r})") from None
    missing = sorted({fn for fn in weight_map.values()
                      if not os.path.exists(os.path.join(path, fn))})
    if missing:
      names = [n for n, fn in weight_map.items() if fn == missing[0]]
      raise FileNotFoundError(
          f"{index}: shard file(s) {missing} not found in {path} (needed for e.g. tensor "
          f"{names[0]!r})")
    return dict(weight_map)
  single = os.path.join(path, SINGLE_FILE)
  if os.path.exists(single):
    with _open_weights(single) as f:
      return {name: SINGLE_FILE for name in f.keys()}
  pickles = [os.path.basename(p) for pat in _PICKLE_PATTERNS
             for p in glob.glob(os.path.join(path, pat))]
  if pickles:
    raise ValueError(
        f"{path}: only pickle weights {sorted(pickles)} found; explore_jax reads safetensors only "
        "and never unpickles. Convert them with a trusted tool first.")
  raise FileNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def _check_headers(path: str, files: dict[str, str], layout: dict, tied: bool) -> dict[str, str]:
  """Validate names and shapes from the file headers only; return the names to read."""
  by_file: dict[str, list[str]] = {}
  for name, fn in files.items():
    by_file.setdefault(fn, []).append(name)
  to_read = {}
  for fn, names in sorted(by_file.items()):
    full = os.path.join(path, fn)
    with _open_weights(full) as f:
      present = set(f.keys())
      for name in names:
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
          continue
        if name not in layout:
          raise ValueError(f"{full}: unexpected tensor {name!r} for a Qwen2 model")
        if name not in present:
          raise ValueError(f"{full}: tensor {name!r} listed in {INDEX_FILE} is not in the file")
        shape = tuple(f.get_slice(name).get_shape())
        if shape != layout[name][1]:
          raise ValueError(f"{full}: tensor {name!r} has shape {shape}, config.json implies "
                           f"{layout[name][1]}")
        to_read[name] = fn
  missing = [name for name in layout if name not in to_read]
  if missing:
    source = INDEX_FILE if len(by_file) > 1 else next(iter(by_file), SINGLE_FILE)
    raise ValueError(f"{os.path.join(path, source)}: missing tensor(s) {missing[:5]}"
                     f"{' ...' if len(missing) > 5 else ''} ({len(missing)} of {len(layout)})")
  return to_read


def _sharding_at(shardings, path: tuple[str, ...]):
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    return shardings
  return _get_path(shardings, path)


def _place(x: np.ndarray, sharding) -> jax.Array:
  if sharding is None:
    return jnp.asarray(x)
  # Each addressable device receives only its slice; no full copy on any single device.
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _dtype_name(dtype) -> str:
  return jnp.dtype(dtype).name


def load_hf(path: str | os.PathLike, dtype=jnp.float32, shardings=None, *,
            compute_dtype=None, scan_layers: bool = False) -> tuple[Qwen2Config, qwen2.Params]:
  """Read an HF Qwen2 safetensors directory into (config, params), one tensor at a time.

  `dtype` is the parameter dtype (config.param_dtype); the compute dtype defaults to the same.
  `shardings`: None (default device), one Sharding for every parameter, a pytree of Shardings
  matching the params, or a function config -> such a pytree (the config is only known here).
  `scan_layers`: the decoder layers stacked on a leading axis (`Qwen2Config.scan_layers`).
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: not a directory")
  dtype = _dtype_name(dtype)
  config = Qwen2Config.from_hf_json(path, param_dtype=dtype, dtype=_dtype_name(
      compute_dtype or dtype), scan_layers=scan_layers)
  if callable(shardings) and not isinstance(shardings, jax.sharding.Sharding):
    shardings = shardings(config)
  layout = _hf_layout(config)
  to_read = _check_headers(path, _weight_files(path), layout, config.tie_word_embeddings)
  read = lambda name: layout[name][2](_read_tensor(path, to_read[name], name)).astype(
      jnp.dtype(dtype))
  params: qwen2.Params = {}
  if config.scan_layers:
    # One parameter kind at a time: its L layers read, stacked on the host, placed at once.
    in_layer = lambda name: layout[name][0][1:2] and layout[name][0][1].startswith("layers_")
    kinds: dict[tuple[str, ...], list[str]] = {}
    for name in to_read:
      tree_path = layout[name][0]
      if in_layer(name):
        kinds.setdefault(("model", "layers") + tree_path[2:], []).append(name)
    for tree_path, names in kinds.items():
      names.sort(key=lambda n: int(layout[n][0][1][len("layers_"):]))
      x = np.stack([read(n) for n in names])
      _set_path(params, tree_path, _place(x, _sharding_at(shardings, tree_path)))
      del x
    to_read = {n: f for n, f in to_read.items() if not in_layer(n)}
  for fn in sorted(set(to_read.values())):
    with _open_weights(os.path.join(path, fn)) as f:
      for name in [n for n, file in to_read.items() if file == fn]:
        tree_path, _, to_jax, _ = layout[name]
        x = to_jax(f.get_tensor(name)).astype(jnp.dtype(dtype))
        _set_path(params, tree_path, _place(x, _sharding_at(shardings, tree_path)))
        del x
  return config, params


def _read_tensor(path: str, fn: str, name: str) -> np.ndarray:
  with _open_weights(os.path.join(path, fn)) as f:
    return f.get_tensor(name)


# --------------------------------------------------------------------------------------------------
# Writing a Hugging Face directory
# --------------------------------------------------------------------------------------------------


def _copy_tokenizer(src: str, dst: str | os.PathLike) -> list[str]:
  copied = [fn for fn in TOKENIZER_FILES if epath.Path(src, fn).exists()]
  for fn in copied:
    (epath.Path(dst) / fn).write_bytes(epath.Path(src, fn).read_bytes())
  return copied


def save_hf(config: Qwen2Config, params: qwen2.Params, path: str | os.PathLike,
            tokenizer_dir: str | os.PathLike | None = None,
            max_shard_bytes: int = 5 * 10**9, *, dtype: str | None = None,
            source_dir: str | os.PathLike | None = None) -> None:
  """Write an HF directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

  Tensors are written in `dtype` (each cast on the host after its gather, so the devices hold no
  copy), by default the params' own (bfloat16 stays bfloat16). Shards are filled greedily in
  layout order up to `max_shard_bytes`; one shard is written as a single `model.safetensors`.
  `source_dir`'s generation_config.json is carried over (`write_hf_config`). `path` may be a
  bucket (gs://). With several processes every one must call this (the tensors are gathered
  collectively); process 0 alone writes.
  """
  _save_hf(config, params, path, tokenizer_dir, max_shard_bytes, collective=True, dtype=dtype,
           source_dir=source_dir)


def save_hf_local(config: Qwen2Config, params: qwen2.Params, path: str | os.PathLike,
                  tokenizer_dir: str | os.PathLike | None = None,
                  max_shard_bytes: int = 5 * 10**9) -> None:
  """`save_hf` of parameters this process holds whole, with no collective: whichever process
  calls it writes a complete directory, whatever the others do. For a model built on one host
  (the tiny base model: every process builds its own copy into a directory of its own)."""
  for x in jax.tree.leaves(params):
    if not getattr(x, "is_fully_addressable", True):
      raise ValueError("save_hf_local: parameters are sharded over several processes; use save_hf")
  _save_hf(config, params, path, tokenizer_dir, max_shard_bytes, collective=False)


def _save_hf(config, params, path, tokenizer_dir, max_shard_bytes, *, collective: bool,
             dtype: str | None = None, source_dir=None) -> None:
  writer = jax.process_index() == 0 if collective else True
  out = epath.Path(os.fspath(path))
  params = qwen2.unstack_layers(params)  # HF names one tensor per layer (a slice, taken lazily)
  layout = _hf_layout(config)
  leaves = {name: _get_path(params, entry[0]) for name, entry in layout.items()}
  dtypes = {str(x.dtype) for x in leaves.values()}
  if dtype is None and len(dtypes) != 1:
    raise ValueError(f"save_hf: parameters have mixed dtypes {sorted(dtypes)}")
  dtype = _dtype_name(dtype or next(iter(dtypes)))
  itemsize = jnp.dtype(dtype).itemsize

  shards: list[list[str]] = [[]]
  shard_bytes = 0
  for name, x in leaves.items():
    nbytes = x.size * itemsize
    if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
      shards.append([])
      shard_bytes = 0
    shards[-1].append(name)
    shard_bytes += nbytes
  n = len(shards)
  file_names = ([SINGLE_FILE] if n == 1 else
                [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])

  def clear():
    # Remove weights of an earlier export so a directory never mixes two layouts.
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("model*.safetensors"), out / INDEX_FILE]:
      if old.exists():
        old.unlink()

  if collective:
    sharding.on_main(clear, f"save_hf: clearing {out}")
  else:
    clear()
  failed = None
  for fn, names in zip(file_names, shards):
    # Only this shard's tensors are on the host at once (gathered from devices if sharded). Every
    # process takes part in every gather, so a failed write is raised after the last one.
    tensors = {name: layout[name][3](sharding.to_host(leaves[name]).astype(jnp.dtype(dtype),
                                                                           copy=False))
               for name in names}
    if writer and failed is None:
      try:
        (out / fn).write_bytes(safetensors_bytes(tensors, metadata={"format": "pt"}))
      except Exception as e:  # raised below, on every process
        failed = e
    del tensors
  if collective:
    sharding.raise_together(failed, f"save_hf: writing {out}")
  elif failed is not None:
    raise failed
  if not writer:
    return
  if n > 1:
    total = sum(x.size * itemsize for x in leaves.values())
    index = {"metadata": {"total_size": int(total)},
             "weight_map": {name: fn for fn, names in zip(file_names, shards) for name in names}}
    _write_json(out / INDEX_FILE, index)

  write_hf_config(config, out, dtype, tokenizer_dir, source_dir)


GENERATION_CONFIG = "generation_config.json"


def write_hf_config(config: Qwen2Config, path: str | os.PathLike, dtype: str,
                    tokenizer_dir: str | os.PathLike | None = None,
                    source_dir: str | os.PathLike | None = None) -> None:
  """The files of an HF directory besides its weights: config.json (weights in `dtype`),
  generation_config.json and the tokenizer's files. `path` may be a bucket.

  generation_config.json is `source_dir`'s (then `tokenizer_dir`'s) when it has one: the
  released model's sampling defaults and its list of EOS tokens travel with it; else one naming
  the config's BOS and EOS tokens."""
  out = epath.Path(os.fspath(path))
  out.mkdir(parents=True, exist_ok=True)
  hf_config = config.to_hf_dict()
  hf_config["torch_dtype"] = hf_config["dtype"] = str(dtype)
  _write_json(out / "config.json", hf_config)
  sources = [epath.Path(os.fspath(d), GENERATION_CONFIG) for d in (source_dir, tokenizer_dir)
             if d is not None]
  found = next((src for src in sources if src.exists()), None)
  if found is not None:
    (out / GENERATION_CONFIG).write_bytes(found.read_bytes())
  else:
    _write_json(out / GENERATION_CONFIG,
                {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id})
  if tokenizer_dir is not None:
    if not _copy_tokenizer(os.fspath(tokenizer_dir), out):
      raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")


def _write_json(path: str | os.PathLike, obj) -> None:
  epath.Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------
# Orbax
# --------------------------------------------------------------------------------------------------

ORBAX_META = "explore_jax_model.json"


def save_orbax(config: Qwen2Config, params: qwen2.Params, path: str | os.PathLike,
               tokenizer_dir: str | os.PathLike | None = None) -> None:
  """Params (actor or critic) to `path/params` with orbax; the config beside it as JSON."""
  import orbax.checkpoint as ocp  # imported lazily: it is slow to import and only needed here

  path = os.path.abspath(os.fspath(path))
  os.makedirs(path, exist_ok=True)
  dtype = str(params["model"]["embed_tokens"].dtype)
  meta = {"config": dataclasses.asdict(config.replace(param_dtype=dtype)),
          "critic": "value_head" in params}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), params, force=True)
    ckptr.wait_until_finished()
  _write_json(os.path.join(path, ORBAX_META), meta)
  if tokenizer_dir is not None:
    _copy_tokenizer(os.fspath(tokenizer_dir), path)
    # The generation config rides along, so that orbax-to-hf writes the source's again.
    generation = epath.Path(os.fspath(tokenizer_dir), GENERATION_CONFIG)
    if generation.exists():
      (epath.Path(path) / GENERATION_CONFIG).write_bytes(generation.read_bytes())


def load_orbax(path: str | os.PathLike, shardings=None, *, dtype=None
               ) -> tuple[Qwen2Config, qwen2.Params]:
  """Restore (config, params) saved by `save_orbax`; `shardings` as in `load_hf`."""
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.fspath(path))
  meta_path = os.path.join(path, ORBAX_META)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{path}: no {ORBAX_META}; not an explore_jax orbax checkpoint")
  with open(meta_path) as f:
    meta = json.load(f)
  try:
    config = Qwen2Config(**meta["config"])
  except TypeError as e:
    raise ValueError(f"{meta_path}: bad config ({e})") from None
  if callable(shardings) and not isinstance(shardings, jax.sharding.Sharding):
    shardings = shardings(config)
  shapes = qwen2.param_shapes(config, critic=bool(meta.get("critic")))
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  flat_shapes, treedef = jax.tree.flatten(shapes)
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    flat_shardings = [shardings or default] * len(flat_shapes)
  else:
    flat_shardings = treedef.flatten_up_to(shardings)
  target = treedef.unflatten([jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
                              for s, sh in zip(flat_shapes, flat_shardings)])
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(path, "params"), target)
  if dtype is not None:
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    config = config.replace(param_dtype=_dtype_name(dtype))
  return config, params


def load_model_config(path: str | os.PathLike) -> Qwen2Config:
  """The model config of an orbax directory from `save_orbax` or of an HF directory, without
  reading a weight."""
  path = os.fspath(path)
  if os.path.exists(os.path.join(path, ORBAX_META)):
    meta_path = os.path.join(path, ORBAX_META)
    with open(meta_path) as f:
      try:
        return Qwen2Config(**json.load(f)["config"])
      except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"{meta_path}: bad config ({e})") from None
  if os.path.exists(os.path.join(path, "config.json")):
    return Qwen2Config.from_hf_json(path)
  raise FileNotFoundError(f"{path}: neither {ORBAX_META} (orbax) nor config.json (HF) found; "
                          "not a model directory")


def saved_dtype(path: str | os.PathLike) -> str:
  """The dtype a model directory's weights are stored in: an HF config.json's `torch_dtype`
  (transformers >= 5: `dtype`), an orbax directory's param_dtype; float32 when it names none.
  The default of every conversion and export, so that a bf16 checkpoint stays bf16."""
  path = os.fspath(path)
  if os.path.exists(os.path.join(path, ORBAX_META)):
    return load_model_config(path).param_dtype
  try:
    with open(os.path.join(path, "config.json")) as f:
      d = json.load(f)
  except (OSError, ValueError):
    return "float32"
  dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
  return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def load_model(path: str | os.PathLike, dtype=None, shardings=None, scan_layers: bool | None = None
               ) -> tuple[Qwen2Config, qwen2.Params]:
  """An orbax directory from `save_orbax` or an HF safetensors directory, by its contents.

  `scan_layers`: the layer layout wanted (None: an orbax directory's own, HF's per-layer one). An
  orbax model saved in the other layout is restacked after restoring (placed as saved first)."""
  path = os.fspath(path)
  if os.path.exists(os.path.join(path, ORBAX_META)):
    config, params = load_orbax(path, None if scan_layers not in (None, _orbax_scan(path))
                                else shardings, dtype=dtype)
    if scan_layers is None or scan_layers == config.scan_layers:
      return config, params
    return restack(config, params, scan_layers, shardings)
  if os.path.exists(os.path.join(path, "config.json")):
    return load_hf(path, jnp.float32 if dtype is None else dtype, shardings,
                   scan_layers=bool(scan_layers))
  raise FileNotFoundError(f"{path}: neither {ORBAX_META} (orbax) nor config.json (HF) found")


def _orbax_scan(path: str) -> bool:
  with open(os.path.join(path, ORBAX_META)) as f:
    return bool(json.load(f)["config"].get("scan_layers", False))  # older metadata: per-layer


def restack(config: Qwen2Config, params: qwen2.Params, scan_layers: bool, shardings=None
            ) -> tuple[Qwen2Config, qwen2.Params]:
  """(config, params) in the other layer layout: stacked for scan_layers, else per layer."""
  config = config.replace(scan_layers=scan_layers)
  params = (qwen2.stack_layers if scan_layers else qwen2.unstack_layers)(params)
  if callable(shardings) and not isinstance(shardings, jax.sharding.Sharding):
    shardings = shardings(config)
  if shardings is not None:
    params = jax.device_put(params, shardings)
  return config, params
