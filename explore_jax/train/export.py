"""A run's actor out of its checkpoints, and checkpoint conversion: Hugging Face safetensors <->
explore_jax orbax.

The trainer ends with `export_hf` (WORKDIR/hf); `restore_actor` reads any checkpoint's actor on one
host. The command line:

  python -m explore_jax.convert hf-to-orbax --hf_dir DIR --out DIR [--dtype bfloat16]
  python -m explore_jax.convert orbax-to-hf --checkpoint DIR --out DIR [--tokenizer_dir DIR]
  python -m explore_jax.convert run-to-hf --workdir RUN_DIR --out DIR [--step N]
  python -m explore_jax.convert restack --checkpoint DIR --out DIR --scan_layers true|false

restack rewrites an orbax model checkpoint in the other decoder-layer layout: stacked on a leading
layer axis (model.scan_layers=True) or one entry per layer (the layout before scan_layers).

run-to-hf exports the actor of a training run's checkpoint (the newest, or step N) from its local
or gs:// workdir, with the model config and tokenizer the trainer keeps in WORKDIR/model: the
final export for a run that skipped it, or any step's model for evaluation.

hf-to-orbax copies the tokenizer files into the orbax directory, so orbax-to-hf restores them
without --tokenizer_dir. Weights keep their dtype unless --dtype is given. Neither direction
imports transformers or executes anything from the input directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from etils import epath
import jax

from explore_jax import paths
from explore_jax.models import checkpoint, qwen2
from explore_jax.tpu import sharding
from explore_jax.train import digest
from explore_jax.train import state as train_state


EXPORT_RECORD = "explore_jax_export.json"  # in the export: the train step it holds
MODEL_DIR = "model"  # in the workdir: the model's HF config and tokenizer, no weights


def restore_actor(workdir: str, step: int | None = None
                  ) -> tuple[qwen2.Qwen2Config, qwen2.Params, int]:
  """(model config, actor params as numpy, step) of a run's checkpoint, the newest when `step` is
  None: only the actor is read, on this host, from a local or gs:// workdir."""
  import orbax.checkpoint as ocp

  workdir = paths.absolute(workdir)  # orbax reads absolute paths only
  hf_path = epath.Path(workdir) / MODEL_DIR / "config.json"
  if not hf_path.exists():
    raise FileNotFoundError(f"{hf_path}: missing; a run started before the trainer kept it "
                            "gets it when its command runs again")
  hf = json.loads(hf_path.read_text())
  model_cfg = qwen2.Qwen2Config.from_hf_dict(hf, source=os.fspath(hf_path),
                                             param_dtype=hf["torch_dtype"])
  ckpt_dir = os.path.join(workdir, "checkpoints")
  with ocp.CheckpointManager(ckpt_dir,
                             options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    steps = manager.all_steps()
  if not steps or (step is not None and step not in steps):
    raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint of step "
                            f"{'any' if step is None else step}; saved: {sorted(steps)}")
  step = max(steps) if step is None else step
  # The actor alone: its shapes as the target, the rest of the state left on disk.
  stacked = train_state.saved_layout(os.path.join(ckpt_dir, str(step), "state")) == "stacked"
  model_cfg = model_cfg.replace(scan_layers=stacked)
  target = {"actor": qwen2.param_shapes(model_cfg)}
  args = ocp.args.PyTreeRestore(target, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target))
  with ocp.PyTreeCheckpointer() as reader:
    restored = reader.restore(os.path.join(ckpt_dir, str(step), "state"), args=args)
  check_actor(ckpt_dir, step, restored["actor"])
  return model_cfg, restored["actor"], step


def check_actor(ckpt_dir: str, step: int, actor) -> None:
  """Refuse an actor that is not what the trainer saved (its digests, `train.digest`) or holds a
  non-finite value, naming the step and the array."""
  record = epath.Path(ckpt_dir) / str(step) / train_state.DIGEST_ITEM / "metadata"
  saved = json.loads(record.read_text())["arrays"] if record.exists() else None
  read, nonfinite = digest.compute({"actor": actor})
  differ = digest.differences(saved, read) if saved is not None else []
  if differ or nonfinite:
    raise ValueError(f"{ckpt_dir}: checkpoint step {step} is corrupt: "
                     + "; ".join(filter(None, [
                         differ and f"{', '.join(differ[:3])} differ from the digest at save",
                         nonfinite and f"non-finite values in {', '.join(nonfinite[:3])}"]))
                     + ". Export another step (--step)")


def exported_step(path: str) -> int | None:
  """The train step of the export at `path`; None when there is none or it is unfinished."""
  try:
    return int(json.loads((epath.Path(path) / EXPORT_RECORD).read_text())["step"])
  except (OSError, ValueError, KeyError):
    return None


def export_hf(model_cfg, params, path: str, tokenizer_dir: str, step: int) -> None:
  """The trained actor as a Hugging Face directory, local or in a bucket. Every process takes part
  (each tensor is gathered from its shards); process 0 writes. The record of the step goes first
  out, last in, so a directory without it is an unfinished export that the next run redoes."""
  record = epath.Path(path) / EXPORT_RECORD
  sharding.on_main(lambda: record.unlink(missing_ok=True), f"export_hf: {record}")
  checkpoint.save_hf(model_cfg, params, path, tokenizer_dir=tokenizer_dir)
  if jax.process_index() == 0:
    record.write_text(json.dumps({"step": step}))
  logging.info("exported step %d to %s", step, path)


def hf_to_orbax(hf_dir: str, out: str, dtype: str | None = None) -> None:
  config, params = checkpoint.load_hf(hf_dir, dtype or _hf_dtype(hf_dir))
  checkpoint.save_orbax(config, params, out, tokenizer_dir=hf_dir)


def orbax_to_hf(ckpt: str, out: str, tokenizer_dir: str | None = None,
                dtype: str | None = None) -> None:
  config, params = checkpoint.load_orbax(ckpt, dtype=dtype)
  if tokenizer_dir is None and any(os.path.exists(os.path.join(ckpt, fn))
                                   for fn in checkpoint.TOKENIZER_FILES):
    tokenizer_dir = ckpt
  checkpoint.save_hf(config, params, out, tokenizer_dir=tokenizer_dir)


def run_to_hf(workdir: str, out: str, step: int | None = None) -> int:
  """The actor of a training run's checkpoint as an HF directory; returns the step exported."""
  workdir, out = paths.absolute(workdir), paths.absolute(out)
  config, params, step = restore_actor(workdir, step)
  checkpoint.save_hf(config, params, out, tokenizer_dir=os.path.join(workdir, MODEL_DIR))
  return step


def restack(ckpt: str, out: str, scan_layers: bool) -> None:
  config, params = checkpoint.load_orbax(ckpt)
  config, params = checkpoint.restack(config, params, scan_layers)
  has_tokenizer = any(os.path.exists(os.path.join(ckpt, fn)) for fn in checkpoint.TOKENIZER_FILES)
  checkpoint.save_orbax(config, params, out, tokenizer_dir=ckpt if has_tokenizer else None)


def _hf_dtype(hf_dir: str) -> str:
  """The checkpoint's own dtype from config.json, so a conversion is lossless by default."""
  import json
  with open(os.path.join(hf_dir, "config.json")) as f:
    d = json.load(f)
  dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
  return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m explore_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  to_orbax = sub.add_parser("hf-to-orbax", help="HF safetensors directory -> orbax checkpoint")
  to_orbax.add_argument("--hf_dir", required=True)
  to_orbax.add_argument("--out", required=True)
  to_orbax.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
  to_hf = sub.add_parser("orbax-to-hf", help="orbax checkpoint -> HF safetensors directory")
  to_hf.add_argument("--checkpoint", required=True)
  to_hf.add_argument("--out", required=True)
  to_hf.add_argument("--tokenizer_dir")
  to_hf.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
  from_run = sub.add_parser("run-to-hf", help="a training run's checkpoint -> HF directory")
  from_run.add_argument("--workdir", required=True, help="the run's workdir (local or gs://)")
  from_run.add_argument("--out", required=True)
  from_run.add_argument("--step", type=int, help="default: the newest checkpoint")
  re = sub.add_parser("restack", help="orbax checkpoint -> the other decoder-layer layout")
  re.add_argument("--checkpoint", required=True)
  re.add_argument("--out", required=True)
  re.add_argument("--scan_layers", required=True, choices=("true", "false"))
  args = parser.parse_args(argv)
  try:
    if args.command == "hf-to-orbax":
      hf_to_orbax(args.hf_dir, args.out, args.dtype)
    elif args.command == "orbax-to-hf":
      orbax_to_hf(args.checkpoint, args.out, args.tokenizer_dir, args.dtype)
    elif args.command == "restack":
      restack(args.checkpoint, args.out, args.scan_layers == "true")
    else:
      print(f"step {run_to_hf(args.workdir, args.out, args.step)}")
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(f"wrote {args.out}")
