#!/usr/bin/env bash
# Launch explore_jax on a Cloud TPU VM or pod slice: the same command on every worker.
#
#   ./launch_tpu.sh create --project P --zone us-central2-b --accelerator-type v4-32 --name rl-7b
#   ./launch_tpu.sh setup  --project P --zone us-central2-b --name rl-7b   # copy code, pip install
#   ./launch_tpu.sh run    --project P --zone us-central2-b --name rl-7b \
#       --bucket gs://my-bucket/explore_jax --config configs/ppo_qwen25_7b.py -- --config.seed=1
#   ./launch_tpu.sh logs   ... --worker 3 [--follow]    ./launch_tpu.sh stop ...    delete ...
#   ./launch_tpu.sh evaluate --project P --zone us-central2-b --name rl-7b \
#       --workdir /home/me/eval --config configs/eval_paper.py -- --config.model=/data/ckpt
#
# Every worker runs `python -m explore_jax.train ... --config.distributed.coordinator=auto` (or
# explore_jax.evaluate); jax.distributed.initialize() then finds the other workers from the TPU
# metadata. A run's checkpoints and metrics go to a gs:// workdir that every worker reaches; an
# evaluation's results to a directory on worker 0, where its process 0 writes them. One job at a
# time (the chips take one): each worker keeps its log in ~/explore_jax_logs/job.log.
# `--dry-run` prints each command (one per line, shell-quoted) instead of running it, and needs no
# gcloud.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch_tpu.sh COMMAND [flags] [-- extra args]

commands:
  create   create the TPU VM / pod slice (reused when it already exists)
  setup    copy this checkout (or --repo URL --ref REF) to every worker and pip install it
           with the TPU JAX extra into ~/explore_jax_venv
  run      start `python -m explore_jax.train --config CONFIG --workdir WORKDIR [args after --]`
           on every worker in the background; per-worker log ~/explore_jax_logs/job.log
  evaluate the same with `python -m explore_jax.evaluate` (config default configs/eval_paper.py);
           WORKDIR is a directory on worker 0's disk, where the results are written; the model
           (--config.model=DIR after --) must be on every worker's disk
  logs     print (or --follow) the job's log of one worker (--worker N, default 0; or all)
  stop     send SIGTERM to the job on every worker (a trainer checkpoints and exits; an evaluation
           resumes from its saved responses); --force: SIGKILL
  delete   delete the TPU VM / pod slice
  ssh      open a shell on --worker N, or run the command given after -- on --worker (default all)
  status   describe the TPU

flags (environment variable in brackets):
  --project P            GCP project [TPU_PROJECT]                       (required)
  --zone Z               zone, e.g. us-central2-b [TPU_ZONE]             (required)
  --name N               TPU name [TPU_NAME]                             (required)
  --accelerator-type T   e.g. v4-32, v5p-64, v5litepod-16 [TPU_ACCELERATOR_TYPE] (create)
  --version V            TPU runtime version [TPU_VERSION]; default from the accelerator:
                         v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                         v6e v2-alpha-tpuv6e
  --spot                 create a Spot (preemptible) TPU [TPU_SPOT=1]
  --bucket gs://B/PATH   where run workdirs live [TPU_BUCKET]; workdir = BUCKET/NAME/CONFIG-NAME
  --workdir DIR          run: gs://..., overriding --bucket [TPU_WORKDIR];
                         evaluate: an absolute path on worker 0 (the flag only)
  --config PATH[:ARG]    job config, relative to the checkout; run: [TPU_CONFIG], default
                         configs/grpo_qwen25_7b.py; evaluate: the flag only, default
                         configs/eval_paper.py
  --repo URL --ref REF   setup clones URL at REF (default main) instead of copying this checkout
                         [TPU_REPO, TPU_REF]
  --data DIR             setup copies DIR to ~/shared/data on every worker, where the package
                         looks for the benchmark data [TPU_DATA] (default \$EXPLORE_JAX_DATA, else
                         ../shared/data next to this checkout)
  --jax SPEC             setup: a JAX to install over the locked one (requirements/tpu.txt, the
                         default: jax, jaxlib and libtpu pinned together) [TPU_JAX_SPEC]
  --python EXE           Python on the workers [TPU_PYTHON] (default python3.11, apt-installed)
  --env KEY=VALUE        extra environment for the trainer (repeatable)
  --worker W             worker for logs / ssh: an index, a comma list, or all
  --follow, -f           logs: keep following
  --force                stop: SIGKILL instead of SIGTERM
  --dry-run              print the commands, run nothing [TPU_DRY_RUN=1]
  -h, --help             this text
EOF
}

die() {
  echo "launch_tpu.sh: error: $*" >&2
  exit 2
}

# ---- arguments -----------------------------------------------------------------------------------

[[ $# -gt 0 ]] || { usage >&2; exit 2; }
commands="create, setup, run, evaluate, logs, stop, delete, ssh, status"
case "$1" in
  -h|--help) usage; exit 0 ;;
  create|setup|run|evaluate|logs|stop|delete|ssh|status) cmd="$1"; shift ;;
  *) die "unknown command '$1' (expected one of: $commands)" ;;
esac

project="${TPU_PROJECT:-}"
zone="${TPU_ZONE:-}"
name="${TPU_NAME:-}"
accel="${TPU_ACCELERATOR_TYPE:-}"
version="${TPU_VERSION:-}"
spot="${TPU_SPOT:-0}"
bucket="${TPU_BUCKET:-}"
workdir=""
config=""
data="${TPU_DATA:-}"
repo="${TPU_REPO:-}"
ref="${TPU_REF:-main}"
jax_spec="${TPU_JAX_SPEC:-}"
python="${TPU_PYTHON:-python3.11}"
dry_run="${TPU_DRY_RUN:-0}"
worker=""
follow=0
force=0
envs=()
extra=()

need_value() {
  [[ $# -ge 2 && -n "$2" ]] || die "flag $1 needs a value"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) need_value "$@"; project="$2"; shift 2 ;;
    --zone) need_value "$@"; zone="$2"; shift 2 ;;
    --name) need_value "$@"; name="$2"; shift 2 ;;
    --accelerator-type) need_value "$@"; accel="$2"; shift 2 ;;
    --version) need_value "$@"; version="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --bucket) need_value "$@"; bucket="$2"; shift 2 ;;
    --workdir) need_value "$@"; workdir="$2"; shift 2 ;;
    --config) need_value "$@"; config="$2"; shift 2 ;;
    --data) need_value "$@"; data="$2"; shift 2 ;;
    --repo) need_value "$@"; repo="$2"; shift 2 ;;
    --ref) need_value "$@"; ref="$2"; shift 2 ;;
    --jax) need_value "$@"; jax_spec="$2"; shift 2 ;;
    --python) need_value "$@"; python="$2"; shift 2 ;;
    --env) need_value "$@"; [[ "$2" == *=* ]] || die "--env $2: expected KEY=VALUE"
      envs+=("$2"); shift 2 ;;
    --worker) need_value "$@"; worker="$2"; shift 2 ;;
    --follow|-f) follow=1; shift ;;
    --force) force=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    --*=*) die "use '${1%%=*} VALUE', not '$1'" ;;
    *) die "unknown argument '$1' for '$cmd' (see --help)" ;;
  esac
done

[[ -n "$project" ]] || die "missing --project (or \$TPU_PROJECT)"
[[ -n "$zone" ]] || die "missing --zone (or \$TPU_ZONE)"
[[ -n "$name" ]] || die "missing --name (or \$TPU_NAME)"
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "--name '$name': use lowercase letters, digits and hyphens, starting with a letter"
[[ "$worker" =~ ^(all|[0-9]+(,[0-9]+)*)?$ ]] || die "--worker '$worker': an index, a list or all"

# ---- running or printing -------------------------------------------------------------------------

# One word for a shell: as is when it is plain, else in single quotes (' written as '\'').
quote() {
  if [[ "$1" =~ ^[-A-Za-z0-9_./=:,@%+]+$ ]]; then
    printf '%s' "$1"
  else
    local q="'\\''"
    printf "'%s'" "${1//\'/$q}"
  fi
}

# Words quoted and joined by spaces: a command line for a shell (local or a worker's).
join_quoted() {
  local out="" arg
  for arg in "$@"; do
    out+="$(quote "$arg") "
  done
  printf '%s' "${out% }"
}

# Run a command, or in dry-run mode print it shell-quoted on one line of stdout.
do_cmd() {
  if [[ "$dry_run" == 1 ]]; then
    join_quoted "$@"
    echo
  else
    echo "+ $*" >&2
    "$@"
  fi
}

tpu_flags=(--zone="$zone" --project="$project")

ssh_workers() {  # ssh_workers WORKERS COMMAND_STRING
  do_cmd gcloud compute tpus tpu-vm ssh "$name" "${tpu_flags[@]}" --worker="$1" --command="$2"
}

default_version() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default --version for accelerator '$1'; give --version" ;;
  esac
}

# Paths on the workers, expanded by their shell (hence the literal $HOME).
# shellcheck disable=SC2016
home='$HOME'
logs_dir="$home/explore_jax_logs" code_dir="$home/explore_jax" venv_dir="$home/explore_jax_venv"

# ---- commands ------------------------------------------------------------------------------------

cmd_create() {
  [[ -n "$accel" ]] || die "create: missing --accelerator-type (or \$TPU_ACCELERATOR_TYPE)"
  [[ "$accel" =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] \
    || die "--accelerator-type '$accel': expected e.g. v4-32, v5p-64, v5litepod-16"
  [[ -n "$version" ]] || version="$(default_version "$accel")"
  local create=(gcloud compute tpus tpu-vm create "$name" "${tpu_flags[@]}"
                --accelerator-type="$accel" --version="$version")
  if [[ "$spot" == 1 ]]; then create+=(--spot); fi
  if [[ "$dry_run" == 1 ]]; then
    do_cmd gcloud compute tpus tpu-vm describe "$name" "${tpu_flags[@]}" --format='value(state)'
    do_cmd "${create[@]}"
  elif state="$(gcloud compute tpus tpu-vm describe "$name" "${tpu_flags[@]}" \
                  --format='value(state)' 2>/dev/null)"; then
    echo "launch_tpu.sh: reusing TPU '$name' in $zone (state $state)" >&2
  else
    do_cmd "${create[@]}"
  fi
}

cmd_setup() {
  local fetch root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  if [[ -n "$repo" ]]; then
    fetch="rm -rf $code_dir && git clone --quiet $(join_quoted "$repo") $code_dir"
    fetch+=" && git -C $code_dir checkout --quiet $(join_quoted "$ref")"
  else
    # Ship the working tree (uncommitted edits included) without the venv, git data and caches.
    local tarball
    tarball="${TMPDIR:-/tmp}/explore_jax_${name}.tar.gz"
    do_cmd tar -czf "$tarball" -C "$root" --exclude=./.venv --exclude=./.git \
      --exclude=__pycache__ --exclude=.pytest_cache --exclude='*.egg-info' --exclude=./shared .
    do_cmd gcloud compute tpus tpu-vm scp "$tarball" "$name:explore_jax.tar.gz" \
      "${tpu_flags[@]}" --worker=all
    do_cmd rm -f "$tarball"
    fetch="rm -rf $code_dir && mkdir -p $code_dir && tar -xzf $home/explore_jax.tar.gz -C $code_dir"
    # Without .git there, the run records this commit from COMMIT (explore_jax.provenance).
    local commit
    commit="$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
    if [[ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
      commit+="+uncommitted"
    fi
    fetch+=" && echo $commit > $code_dir/COMMIT"
  fi
  # The benchmark data goes where the package looks by default: ../shared/data next to the code.
  local data_dir="${data:-${EXPLORE_JAX_DATA:-$root/../shared/data}}"
  if [[ -d "$data_dir" ]]; then
    local data_tar="${TMPDIR:-/tmp}/explore_jax_${name}_data.tar.gz"
    do_cmd tar -czf "$data_tar" -C "$data_dir" .
    do_cmd gcloud compute tpus tpu-vm scp "$data_tar" "$name:explore_jax_data.tar.gz" \
      "${tpu_flags[@]}" --worker=all
    do_cmd rm -f "$data_tar"
    fetch+=" && rm -rf $home/shared/data && mkdir -p $home/shared/data"
    fetch+=" && tar -xzf $home/explore_jax_data.tar.gz -C $home/shared/data"
  else
    echo "launch_tpu.sh: warning: no data directory '$data_dir' (--data DIR): the workers get" \
      "none, so runs there need --config.data.data_dir" >&2
  fi
  # Qwen2 code needs Python >= 3.11; Ubuntu 22.04 TPU images ship 3.10, so apt brings 3.11.
  local install="set -e; $fetch"
  install+=" && (command -v $(join_quoted "$python") >/dev/null || (sudo apt-get update -qq"
  install+=" && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq"
  install+=" $(join_quoted "$python") $(join_quoted "$python-venv")))"
  install+=" && ([ -x $venv_dir/bin/python ] || $(join_quoted "$python") -m venv $venv_dir)"
  install+=" && $venv_dir/bin/pip install -q --upgrade pip"
  # The locked versions (make lock), the package itself without resolving anything again.
  install+=" && cd $code_dir && $venv_dir/bin/pip install -q -r requirements/tpu.txt"
  install+=" && $venv_dir/bin/pip install -q --no-deps -e ."
  if [[ -n "$jax_spec" ]]; then
    install+=" && $venv_dir/bin/pip install -q $(join_quoted "$jax_spec")"
  fi
  install+=" && $venv_dir/bin/python -c 'import jax; print(jax.process_index(), jax.devices())'"
  ssh_workers all "$install"
}

workdir_for_run() {
  if [[ -z "$workdir" ]]; then
    [[ -n "$bucket" ]] \
      || die "run: missing --workdir gs://... or --bucket gs://... (or \$TPU_BUCKET)"
    local run_name
    run_name="$(basename "${config%%:*}" .py)"
    if [[ "$config" == *:* ]]; then run_name+="-${config#*:}"; fi
    run_name="${run_name//[^A-Za-z0-9._=-]/_}"
    workdir="${bucket%/}/$name/$run_name"
  fi
  [[ "$workdir" == gs://?* ]] \
    || die "workdir '$workdir': must be a gs:// path that every worker can reach"
}

# Start `python -m MODULE --config CONFIG --workdir WORKDIR ...` on every worker, in the background.
start_job() {  # start_job MODULE WORKDIR
  # coordinator=auto: jax.distributed.initialize() reads the pod's workers from the TPU metadata.
  local args=(-m "$1" --config "$config" --workdir "$2"
              --config.distributed.coordinator=auto ${extra[@]+"${extra[@]}"})
  # The venv path must expand on the worker (~), so it stays unquoted.
  local line
  line="$venv_dir/bin/python $(join_quoted "${args[@]}")"
  if [[ ${#envs[@]} -gt 0 ]]; then
    line="env $(join_quoted "${envs[@]}") $line"
  fi
  local start="set -e; mkdir -p $logs_dir; cd $code_dir"
  start+="; if [ -f $logs_dir/job.pid ] && kill -0 \"\$(cat $logs_dir/job.pid)\" 2>/dev/null;"
  start+=" then echo \"\$(hostname): already running (pid \$(cat $logs_dir/job.pid))\" >&2;"
  start+=" exit 1; fi"
  start+="; nohup $line > $logs_dir/job.log 2>&1 < /dev/null &"
  start+=" echo \$! > $logs_dir/job.pid; echo \"\$(hostname): started pid \$!\""
  ssh_workers all "$start"
}

cmd_run() {
  config="${config:-${TPU_CONFIG:-configs/grpo_qwen25_7b.py}}"
  workdir="${workdir:-${TPU_WORKDIR:-}}"
  workdir_for_run
  start_job explore_jax.train "$workdir"
  echo "launch_tpu.sh: workdir $workdir; logs: $0 logs --name $name --worker 0 -f" >&2
}

cmd_evaluate() {
  config="${config:-configs/eval_paper.py}"
  [[ -n "$workdir" ]] \
    || die "evaluate: missing --workdir DIR (a directory on worker 0, where the results go)"
  # responses.jsonl is appended to as batches finish, which a gs:// object does not allow.
  [[ "$workdir" != gs://* ]] \
    || die "evaluate: workdir '$workdir': must be a directory on worker 0's disk, not gs://"
  [[ "$workdir" == /* ]] \
    || die "evaluate: workdir '$workdir': give an absolute path on worker 0, e.g. /home/me/eval"
  start_job explore_jax.evaluate "$workdir"
  echo "launch_tpu.sh: results in $workdir on worker 0" >&2
  echo "launch_tpu.sh: logs: $0 logs --name $name --worker 0 -f" >&2
}

cmd_logs() {
  local tail_cmd="tail -n 200"
  if [[ "$follow" == 1 ]]; then tail_cmd="tail -n 200 -F"; fi
  # Prefix lines with the host so that logs of several workers stay apart.
  ssh_workers "${worker:-0}" "$tail_cmd $logs_dir/job.log | sed -u \"s/^/[\$(hostname)] /\""
}

cmd_stop() {
  local sig=TERM
  if [[ "$force" == 1 ]]; then sig=KILL; fi
  local stop="if [ -f $logs_dir/job.pid ]; then kill -$sig \"\$(cat $logs_dir/job.pid)\""
  stop+=" 2>/dev/null && echo \"\$(hostname): sent SIG$sig\" || echo \"\$(hostname): not running\";"
  stop+=" else echo \"\$(hostname): no run\"; fi"
  ssh_workers "${worker:-all}" "$stop"
}

cmd_delete() {
  do_cmd gcloud compute tpus tpu-vm delete "$name" "${tpu_flags[@]}" --quiet
}

cmd_ssh() {
  if [[ ${#extra[@]} -gt 0 ]]; then
    ssh_workers "${worker:-all}" "${extra[*]}"
  else
    do_cmd gcloud compute tpus tpu-vm ssh "$name" "${tpu_flags[@]}" --worker="${worker:-0}"
  fi
}

cmd_status() {
  do_cmd gcloud compute tpus tpu-vm describe "$name" "${tpu_flags[@]}"
}

if [[ "$dry_run" != 1 ]] && ! command -v gcloud >/dev/null; then
  die "gcloud not found: install the Google Cloud CLI, or use --dry-run"
fi
"cmd_$cmd"
