"""A run's actor out of its checkpoints, checkpoint conversion (Hugging Face safetensors <->
explore_jax orbax), and the parity check of a checkpoint against transformers.

The trainer ends with `export_hf` (WORKDIR/hf); `restore_actor` reads any checkpoint's actor on one
host. The command line:

  python -m explore_jax.convert hf-to-orbax --hf_dir DIR_OR_HUB_ID --out DIR [--dtype bfloat16]
  python -m explore_jax.convert orbax-to-hf --checkpoint DIR --out DIR [--tokenizer_dir DIR]
  python -m explore_jax.convert run-to-hf --workdir RUN_DIR --out DIR [--step N] [--dtype D]
  python -m explore_jax.convert restack --checkpoint DIR --out DIR --scan_layers true|false
  python -m explore_jax.convert check --hf_dir DIR_OR_HUB_ID [--prompt TEXT ...]

restack rewrites an orbax model checkpoint in the other decoder-layer layout: stacked on a leading
layer axis (model.scan_layers=True) or one entry per layer (the layout before scan_layers).

run-to-hf exports the actor of a training run's checkpoint (the newest, or step N) from its local
or gs:// workdir, with the model config, generation config and tokenizer the trainer keeps in
WORKDIR/model: the final export for a run that skipped it, or any step's model for evaluation.

Weights keep the source checkpoint's dtype unless --dtype is given: hf-to-orbax keeps the HF
directory's torch_dtype; run-to-hf and the trainer's export write the dtype of the model the run
started from (a bf16 Qwen2.5 stays bf16, though the run's master weights are float32). The source's
generation_config.json travels through every conversion. hf-to-orbax copies the tokenizer files
into the orbax directory, so orbax-to-hf restores them without --tokenizer_dir. None of these
import transformers or execute anything from the input directory.

check loads an HF directory both ways, explore_jax's JAX model and transformers' PyTorch one, runs a
few prompts through each (float32 unless --dtype) and prints the largest logit difference and how
often the two agree on the next token (`explore_jax.models.parity`); it exits 1 when they differ
by more than --max_diff or agree less than --min_agreement: the gate to run on one's own
checkpoint before training from it. It needs torch.
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
from explore_jax.config import cli as cli_lib
from explore_jax.models import checkpoint, qwen2
from explore_jax.models import files as model_files
from explore_jax.tpu import sharding
from explore_jax.train import digest
from explore_jax.train import state as train_state


EXPORT_RECORD = "explore_jax_export.json"  # in the export: the train step it holds
DTYPES = ("float32", "bfloat16", "float16")
MODEL_DIR = "model"  # in the workdir: the model's HF config and tokenizer, no weights
# In WORKDIR/model: the model the run started from and the dtype its weights were stored in
# (config.json there names the run's parameter dtype, the checkpoints' own).
SOURCE_RECORD = "explore_jax_source.json"


def write_model_dir(workdir: str, model_cfg: qwen2.Qwen2Config, model_path: str, model_dir: str,
                    tokenizer_dir: str) -> None:
  """WORKDIR/model: config.json (the checkpoints' dtype), the source's generation config, the
  tokenizer, and SOURCE_RECORD. Enough to export any checkpoint wherever the workdir is read."""
  out = os.path.join(workdir, MODEL_DIR)
  checkpoint.write_hf_config(model_cfg, out, model_cfg.param_dtype, tokenizer_dir,
                             source_dir=model_dir)
  record = {"model": model_path, "torch_dtype": checkpoint.saved_dtype(model_dir)}
  (epath.Path(out) / SOURCE_RECORD).write_text(json.dumps(record, indent=1) + "\n")


def source_dtype(workdir: str) -> str:
  """The dtype of the weights a run started from (SOURCE_RECORD), for its exports; a workdir
  written before the record was kept: its checkpoints' dtype."""
  model = epath.Path(workdir) / MODEL_DIR
  try:
    return json.loads((model / SOURCE_RECORD).read_text())["torch_dtype"]
  except (OSError, ValueError, KeyError):
    return json.loads((model / "config.json").read_text())["torch_dtype"]


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
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)  # orbax warns that a read_only manager's directory is read only
  try:
    with ocp.CheckpointManager(ckpt_dir if "://" in ckpt_dir else os.path.abspath(ckpt_dir),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
      steps = manager.all_steps()
  finally:
    absl_log.setLevel(level)
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


def export_hf(model_cfg, params, path: str, tokenizer_dir: str, step: int,
              dtype: str | None = None, source_dir: str | None = None) -> None:
  """The trained actor as a Hugging Face directory, local or in a bucket, its weights in `dtype`
  (default: the params'), `source_dir`'s generation config carried over. Every process takes
  part (each tensor is gathered from its shards); process 0 writes. The record of the step goes
  first out, last in, so a directory without it is an unfinished export that the next run
  redoes."""
  record = epath.Path(path) / EXPORT_RECORD
  sharding.on_main(lambda: record.unlink(missing_ok=True), f"export_hf: {record}")
  checkpoint.save_hf(model_cfg, params, path, tokenizer_dir=tokenizer_dir, dtype=dtype,
                     source_dir=source_dir)
  if jax.process_index() == 0:
    record.write_text(json.dumps({"step": step}))
  logging.info("exported step %d to %s (%s)", step, path, dtype or "the parameters' dtype")


def hf_to_orbax(hf_dir: str, out: str, dtype: str | None = None) -> None:
  hf_dir = model_files.local_dir(hf_dir, "--hf_dir")
  config, params = checkpoint.load_hf(hf_dir, dtype or checkpoint.saved_dtype(hf_dir))
  checkpoint.save_orbax(config, params, out, tokenizer_dir=hf_dir)


def orbax_to_hf(ckpt: str, out: str, tokenizer_dir: str | None = None,
                dtype: str | None = None) -> None:
  config, params = checkpoint.load_orbax(ckpt, dtype=dtype)
  if tokenizer_dir is not None:
    tokenizer_dir = model_files.local_dir(tokenizer_dir, "--tokenizer_dir", kind="tokenizer")
  elif any(os.path.exists(os.path.join(ckpt, fn)) for fn in checkpoint.TOKENIZER_FILES):
    tokenizer_dir = ckpt
  checkpoint.save_hf(config, params, out, tokenizer_dir=tokenizer_dir, source_dir=ckpt)


def run_to_hf(workdir: str, out: str, step: int | None = None, dtype: str | None = None) -> int:
  """The actor of a training run's checkpoint as an HF directory, in `dtype` (default: the dtype
  of the model the run started from); returns the step exported."""
  workdir, out = paths.absolute(workdir), paths.absolute(out)
  config, params, step = restore_actor(workdir, step)
  model = os.path.join(workdir, MODEL_DIR)
  checkpoint.save_hf(config, params, out, tokenizer_dir=model, dtype=dtype or source_dtype(workdir),
                     source_dir=model)
  return step


def restack(ckpt: str, out: str, scan_layers: bool) -> None:
  config, params = checkpoint.load_orbax(ckpt)
  config, params = checkpoint.restack(config, params, scan_layers)
  has_tokenizer = any(os.path.exists(os.path.join(ckpt, fn)) for fn in checkpoint.TOKENIZER_FILES)
  checkpoint.save_orbax(config, params, out, tokenizer_dir=ckpt if has_tokenizer else None)


def check(hf_dir: str, prompts: list[str], tokenizer: str | None, dtype: str, max_diff: float,
          min_agreement: float) -> bool:
  """`python -m explore_jax.convert check` (module docstring): prints the comparison, returns
  whether it passes."""
  from explore_jax.models import parity
  hf_dir = model_files.local_dir(hf_dir, "--hf_dir")
  tokenizer_dir = (model_files.local_dir(tokenizer, "--tokenizer", kind="tokenizer")
                   if tokenizer else hf_dir)
  report = parity.compare(hf_dir, tokenizer_dir, prompts or list(parity.PROMPTS), dtype)
  ok = report.max_abs_diff <= max_diff and report.argmax_agreement >= min_agreement
  print(f"{hf_dir} ({dtype}, {report.tokens} positions over {len(report.per_prompt)} prompts):")
  for text, diff, agree in report.per_prompt:
    print(f"  max |logit diff| {diff:.3g}  argmax agreement {agree:.3f}  {text[:50]!r}")
  print(f"max |logit diff| {report.max_abs_diff:.3g} (limit {max_diff:g}), argmax agreement "
        f"{report.argmax_agreement:.4f} (at least {min_agreement:g}): "
        f"{'match' if ok else 'MISMATCH'}")
  return ok


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m explore_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--verbose", action="store_true", help="third-party INFO logs too")
  sub = parser.add_subparsers(dest="command", required=True)
  to_orbax = sub.add_parser("hf-to-orbax", help="HF safetensors directory -> orbax checkpoint")
  to_orbax.add_argument("--hf_dir", required=True, help="directory or hub id ORG/NAME[@REV]")
  to_orbax.add_argument("--out", required=True)
  to_orbax.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's own")
  to_hf = sub.add_parser("orbax-to-hf", help="orbax checkpoint -> HF safetensors directory")
  to_hf.add_argument("--checkpoint", required=True)
  to_hf.add_argument("--out", required=True)
  to_hf.add_argument("--tokenizer_dir", help="directory or hub id")
  to_hf.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's own")
  from_run = sub.add_parser("run-to-hf", help="a training run's checkpoint -> HF directory")
  from_run.add_argument("--workdir", required=True, help="the run's workdir (local or gs://)")
  from_run.add_argument("--out", required=True)
  from_run.add_argument("--step", type=int, help="default: the newest checkpoint")
  from_run.add_argument("--dtype", choices=DTYPES,
                        help="default: the dtype of the model the run started from")
  re = sub.add_parser("restack", help="orbax checkpoint -> the other decoder-layer layout")
  re.add_argument("--checkpoint", required=True)
  re.add_argument("--out", required=True)
  re.add_argument("--scan_layers", required=True, choices=("true", "false"))
  chk = sub.add_parser("check", help="JAX logits vs transformers' on a few prompts (needs torch)")
  chk.add_argument("--hf_dir", required=True, help="directory or hub id ORG/NAME[@REV]")
  chk.add_argument("--tokenizer", help="directory or hub id (default: --hf_dir's)")
  chk.add_argument("--prompt", action="append", help="repeatable; default: a few math prompts")
  chk.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="both models' weights and compute")
  chk.add_argument("--max_diff", type=float, default=None,
                   help="largest |logit difference| that passes (default: 1e-2 in float32, "
                   "0.5 in bf16/fp16)")
  chk.add_argument("--min_agreement", type=float, default=None,
                   help="smallest share of positions whose argmax agrees (default: 0.99 in "
                   "float32, 0.9 in bf16/fp16, where near-ties flip)")
  args = parser.parse_args(argv)
  cli_lib.quiet_logs(args.verbose)
  try:
    ok = cli_lib.run_main(lambda: _run(args))
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  if not ok:
    sys.exit(1)


def _run(args: argparse.Namespace) -> bool:
  if args.command == "check":
    exact = args.dtype == "float32"
    max_diff = args.max_diff if args.max_diff is not None else (1e-2 if exact else 0.5)
    agreement = args.min_agreement if args.min_agreement is not None else (0.99 if exact else 0.9)
    return check(args.hf_dir, args.prompt or [], args.tokenizer, args.dtype, max_diff, agreement)
  if args.command == "hf-to-orbax":
    hf_to_orbax(args.hf_dir, args.out, args.dtype)
  elif args.command == "orbax-to-hf":
    orbax_to_hf(args.checkpoint, args.out, args.tokenizer_dir, args.dtype)
  elif args.command == "restack":
    restack(args.checkpoint, args.out, args.scan_layers == "true")
  else:
    print(f"step {run_to_hf(args.workdir, args.out, args.step, args.dtype)}")
  print(f"wrote {args.out}")
  return True
