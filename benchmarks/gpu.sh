#!/usr/bin/env bash
# GPU figures of explore_jax, in under 10 minutes including compiles (about 8 on an H200):
#   (a) train-step MFU at Qwen2.5-0.5B shapes (bf16, sequence 2048, remat)   target >= 45%
#   (b) decode throughput at batch 256 as a fraction of the HBM roofline, static, continuous and
#       paged engines (the paged one with the gather and with the Pallas GPU kernel)
#                                                                             target >= 50%
#   (c) static vs continuous vs paged engines on long-tailed and fixed lengths, Qwen2.5-0.5B
#       layers (bf16, 96-token vocabulary), 256 slots (the paged engine: 1024 over the same KV
#       bytes, gather and Pallas GPU kernel), 2048 rows: benchmarks/rollout_engine.py --preset
# The measuring code and the FLOP / byte formulas are in benchmarks/gpu_bench.py.
#
#   bash benchmarks/gpu.sh            # on a machine with an NVIDIA GPU (H100 / H200 / A100)
#   bash benchmarks/gpu.sh --smoke    # anywhere, on CPU: tiny float32 model, proves the script runs
#
# Environment:
#   PYTHON                 interpreter; default: the first of python3, .venv/bin/python whose jax
#                          has a GPU backend (with --smoke: .venv/bin/python, else python3)
#   GPU_BENCH_INSTALL=0    never install. Otherwise (default 1), when no interpreter has a GPU jax,
#                          create $GPU_BENCH_VENV and `pip install -e . 'jax[cuda12]'` into it
#   GPU_BENCH_VENV         default ${TMPDIR:-/tmp}/explore_jax_gpu_venv (outside the checkout)
#   GPU_BENCH_BUDGET_S     total wall-clock budget in seconds, default 570
#   GPU_BENCH_PHASES       which of a, b, c to run, default "a b c"
# Arguments after the first are passed to gpu_bench.py (e.g. --rows 8 --micro 4).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
START=$SECONDS
BUDGET=${GPU_BENCH_BUDGET_S:-570}
left() { echo $(( BUDGET - (SECONDS - START) )); }
cap() { local l; l=$(left); (( l < $1 )) && echo "$l" || echo "$1"; }  # min(cap, time left)
has_gpu_jax() { "$1" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; }

SMOKE=""
if [[ "${1:-}" == "--smoke" ]]; then
  SMOKE=1
  shift
fi
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT

if [[ -n "$SMOKE" ]]; then
  PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
  # A CPU has no entry in the chip table: nominal peaks, only so that the MFU / roofline
  # arithmetic runs end to end. The smoke figures mean nothing.
  ARGS=(--smoke --peak_tflops 0.1 --hbm_tbps 0.02)
else
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
  PY=${PYTHON:-}
  VENV=${GPU_BENCH_VENV:-${TMPDIR:-/tmp}/explore_jax_gpu_venv}
  if [[ -z "$PY" ]]; then
    for candidate in python3 .venv/bin/python "$VENV/bin/python"; do
      if command -v "$candidate" >/dev/null && has_gpu_jax "$candidate"; then
        PY=$candidate
        break
      fi
    done
  fi
  if [[ -z "$PY" ]]; then
    if [[ "${GPU_BENCH_INSTALL:-1}" == "0" ]]; then
      echo "no python with a GPU jax found and GPU_BENCH_INSTALL=0: set PYTHON=..." >&2
      exit 1
    fi
    echo "== installing jax[cuda12] + explore_jax into $VENV (GPU_BENCH_INSTALL=0 skips)"
    if ! { python3 -m venv "$VENV" \
           && timeout "$(cap 200)" "$VENV/bin/pip" install -q -e . 'jax[cuda12]'; }; then
      echo "install failed or timed out" >&2
      exit 1
    fi
    PY=$VENV/bin/python
    has_gpu_jax "$PY" || { echo "$PY: jax still has no GPU backend" >&2; exit 1; }
  fi
  ARGS=()
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
fi
echo "== python: $PY ($(left) s of the budget left)"

# Separate processes, so that the decode phase starts with the memory of the train phase freed
# and a hung or out-of-memory phase cannot take the other down.
PHASES=${GPU_BENCH_PHASES:-a b c}
rc_a=0 rc_b=0 rc_c=0
# phase LETTER TITLE CAP_S COMMAND...: COMMAND, with at most CAP_S seconds of the budget, when
# GPU_BENCH_PHASES names LETTER; its exit status goes to rc_LETTER.
phase() {
  local letter=$1 title=$2 cap_s=$3 rc
  shift 3
  [[ $PHASES == *$letter* ]] || return 0
  echo "== ($letter) $title ($(left) s left)"
  timeout --kill-after=10 "$(cap "$cap_s")" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  (( rc == 124 )) && echo "($letter) timed out" | tee -a "$LOG"
  printf -v "rc_$letter" %d "$rc"
}
if [[ -n "$SMOKE" ]]; then  # the tiny model, a few rows: proves phase (c) runs
  ENGINE_ARGS=(--rows 32 --slots 8 --repeats 1 --kv_blocks '0,32' --paged_slots 16)
else
  ENGINE_ARGS=(--preset qwen2.5-0.5b --rows 2048 --slots 256 --repeats 2 --kv_blocks '0,64'
               --paged_slots 1024 --page_attention gather,pallas_gpu)
fi
phase a "train step" 150 "$PY" benchmarks/gpu_bench.py train "${ARGS[@]}" "$@"
phase b decode 160 "$PY" benchmarks/gpu_bench.py decode "${ARGS[@]}" "$@"
phase c "rollout engines" 330 env PYTHONPATH=".:${PYTHONPATH:-}" "$PY" \
  benchmarks/rollout_engine.py --no_hf --settings long-tailed,fixed "${ENGINE_ARGS[@]}"

echo "== summary ($(( SECONDS - START )) s in all)"
grep -E "^device|MFU|of roofline|timed out|^(long-tailed|fixed|static|cont\.|paged)" "$LOG" \
  | awk '!seen[$0]++'
exit $(( rc_a != 0 || rc_b != 0 || rc_c != 0 ))
