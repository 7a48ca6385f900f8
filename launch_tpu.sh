#!/usr/bin/env bash
# Launch explore_jax on a Cloud TPU VM or pod slice: the same command on every worker.
#
#   ./launch_tpu.sh create --project P --zone us-central2-b --accelerator-type v4-32 --name rl-7b
#   ./launch_tpu.sh setup  --project P --zone us-central2-b --name rl-7b   # code + locked installs
#   ./launch_tpu.sh run    --project P --zone us-central2-b --name rl-7b --retries 5 \
#       --bucket gs://my-bucket/explore_jax --config configs/ppo_qwen25_7b.py -- --config.seed=1
#   ./launch_tpu.sh logs   ... --worker 3 [--follow]    ./launch_tpu.sh stop ...    delete ...
#   ./launch_tpu.sh evaluate --project P --zone us-central2-b --name rl-7b \
#       --workdir /home/me/eval --config configs/eval_paper.py -- --config.model=/data/ckpt
#
# Every worker runs `python -m explore_jax.train ... --config.distributed.coordinator=auto` (or
# explore_jax.evaluate); jax.distributed.initialize() then finds the other workers from the TPU
# metadata. A run's checkpoints and metrics go to a gs:// workdir that every worker reaches, so a
# rerun of the same command resumes from the last checkpoint. The worker side (preflight, start,
# stop, setup) is in launch_tpu_worker.sh. What create, setup and run did is recorded in
# $TPU_STATE_DIR (default ~/.local/state/explore_jax_launch) for `babysit`. `--dry-run` prints each
# command (one per line, quoted for bash) instead of running it, and needs no gcloud.
set -euo pipefail

here="$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source=launch_tpu_worker.sh
source "$here/launch_tpu_worker.sh"

usage() {
  cat <<'EOF'
usage: launch_tpu.sh COMMAND [flags] [-- extra args]

commands:
  create   create the TPU VM / pod slice; an existing one of the same type is reused, a PREEMPTED
           or TERMINATED one deleted and recreated, one of another type refused; --queued: through
           a queued resource, waiting until it is ACTIVE
  setup    ship the committed files of this checkout at --ref (default HEAD; or clone --repo URL
           at --ref) and the benchmark data to every worker, and install requirements/tpu.txt and
           the package into ~/explore_jax_venv; refused while a job runs
  run      preflight every worker (no job running; stale TPU holders and /tmp/libtpu_lockfile
           cleared), then start `python -m explore_jax.train --config CONFIG --workdir WORKDIR
           [args after --]` on all of them, or on none; per-run log
           ~/explore_jax_logs/job-RUN-ATTEMPT.log (job.log: the newest); --retries N: then watch
           the job as babysit does
  babysit  watch the recorded run: when the TPU is preempted or the job dies, recreate the TPU if
           needed, rerun setup at the run's commit and the same command (the trainer resumes from
           its last checkpoint), up to --retries N times; a job that finished (exit 0 everywhere)
           or was stopped with `stop` is left alone
  evaluate like run with `python -m explore_jax.evaluate` (config default configs/eval_paper.py);
           WORKDIR is a directory on worker 0's disk, where the results are written; the model
           (--config.model=DIR after --) must be on every worker's disk
  logs     print (or --follow) the newest job log of one worker (--worker N, default 0; or all)
  stop     SIGTERM the job on every worker (a trainer checkpoints and exits), SIGKILL what is left
           after --grace seconds, and report how each ended; --force: SIGKILL at once
  delete   delete the TPU VM / pod slice (through its queued resource when it has one)
  ssh      open a shell on --worker N, or run the command after -- on --worker (default all):
           several words are quoted one by one, a single word is a shell command line
  status   describe the TPU

flags (environment variable in brackets):
  --project P            GCP project [TPU_PROJECT]                       (required)
  --zone Z               zone, e.g. us-central2-b [TPU_ZONE]             (required)
  --name N               TPU name [TPU_NAME]                             (required)
  --accelerator-type T   e.g. v4-32, v5p-64, v5litepod-16 [TPU_ACCELERATOR_TYPE] (create)
  --version V            TPU runtime version [TPU_VERSION]; default from the accelerator:
                         v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                         v6e v2-alpha-tpuv6e
  --spot                 a Spot (preemptible) TPU [TPU_SPOT=1]
  --queued               create through `gcloud compute tpus queued-resources` [TPU_QUEUED=1]
  --reserved             use the project's reservation [TPU_RESERVED=1]
  --valid-until-duration D, --valid-until-time T
                         queued: give up on the request after D (e.g. 6h) or at time T
  --internal-ip          reach the workers by their internal IPs (VMs without external IPs;
                         create gives them none) [TPU_INTERNAL_IP=1]
  --bucket gs://B/PATH   where run workdirs live [TPU_BUCKET]; workdir = BUCKET/NAME/CONFIG-NAME
  --workdir DIR          run: gs://..., overriding --bucket [TPU_WORKDIR];
                         evaluate: an absolute path on worker 0 (the flag only)
  --config PATH[:ARG]    job config, relative to the checkout; run: [TPU_CONFIG], default
                         configs/grpo_qwen25_7b.py; evaluate: the flag only, default
                         configs/eval_paper.py
  --repo URL --ref REF   setup: clone URL at REF (default main) on the workers instead of
                         shipping this checkout at REF (default HEAD) [TPU_REPO, TPU_REF]
  --data DIR             setup copies DIR to ~/explore_jax_data on every worker, and jobs there
                         read their data from it (\$EXPLORE_JAX_DATA) [TPU_DATA] (default
                         \$EXPLORE_JAX_DATA; neither: the data files inside the package)
  --jax SPEC             setup: pip-install SPEC over the lock (e.g. a newer 'jax[tpu]==X')
                         [TPU_JAX_SPEC]; default: the locked versions only
  --python EXE           Python on the workers [TPU_PYTHON] (default python3.11, apt-installed)
  --env KEY=VALUE        extra environment for the job (repeatable)
  --retries N            run / babysit: restarts allowed [TPU_RETRIES] (run default 0: no watch)
  --poll S               seconds between checks while watching or waiting [TPU_POLL] (default 60)
  --grace S              stop: seconds from SIGTERM to SIGKILL [TPU_GRACE] (default 300)
  --worker W             worker for logs / ssh / stop: an index, a comma list, or all
  --follow, -f           logs: keep following
  --force                stop: SIGKILL at once
  --dry-run              print the commands, run nothing [TPU_DRY_RUN=1]
  -h, --help             this text
EOF
}

die() {
  echo "launch_tpu.sh: error: $*" >&2
  exit 2
}

note() {
  echo "launch_tpu.sh: $*" >&2
}

# ---- arguments -----------------------------------------------------------------------------------

[[ $# -gt 0 ]] || { usage >&2; exit 2; }
commands="create, setup, run, babysit, evaluate, logs, stop, delete, ssh, status"
case "$1" in
  -h|--help) usage; exit 0 ;;
  create|setup|run|babysit|evaluate|logs|stop|delete|ssh|status) cmd="$1"; shift ;;
  *) die "unknown command '$1' (expected one of: $commands)" ;;
esac

project="${TPU_PROJECT:-}"
zone="${TPU_ZONE:-}"
name="${TPU_NAME:-}"
accel="${TPU_ACCELERATOR_TYPE:-}"
version="${TPU_VERSION:-}"
spot="${TPU_SPOT:-0}"
queued="${TPU_QUEUED:-0}"
reserved="${TPU_RESERVED:-0}"
valid_until_duration=""
valid_until_time=""
internal_ip="${TPU_INTERNAL_IP:-0}"
bucket="${TPU_BUCKET:-}"
workdir=""
config=""
data="${TPU_DATA:-}"
repo="${TPU_REPO:-}"
ref="${TPU_REF:-}"
jax_spec="${TPU_JAX_SPEC:-}"
python="${TPU_PYTHON:-python3.11}"
retries="${TPU_RETRIES:-}"
poll="${TPU_POLL:-60}"
grace="${TPU_GRACE:-300}"
dry_run="${TPU_DRY_RUN:-0}"
state_dir="${TPU_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/explore_jax_launch}"
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
    --queued) queued=1; shift ;;
    --reserved) reserved=1; shift ;;
    --valid-until-duration) need_value "$@"; valid_until_duration="$2"; shift 2 ;;
    --valid-until-time) need_value "$@"; valid_until_time="$2"; shift 2 ;;
    --internal-ip) internal_ip=1; shift ;;
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
    --retries) need_value "$@"; retries="$2"; shift 2 ;;
    --poll) need_value "$@"; poll="$2"; shift 2 ;;
    --grace) need_value "$@"; grace="$2"; shift 2 ;;
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
[[ -z "$retries" || "$retries" =~ ^[0-9]+$ ]] || die "--retries '$retries': a count, e.g. 5"
[[ "$poll" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--poll '$poll': seconds, e.g. 60"
[[ "$grace" =~ ^[0-9]+$ ]] || die "--grace '$grace': whole seconds, e.g. 300"
[[ "$spot" == 1 && "$reserved" == 1 ]] && die "--spot and --reserved exclude each other"
[[ -n "$valid_until_duration" && -n "$valid_until_time" ]] \
  && die "give one of --valid-until-duration and --valid-until-time"
[[ "$queued" == 1 || -z "$valid_until_duration$valid_until_time" ]] \
  || die "--valid-until-duration / --valid-until-time need --queued"

# ---- running or printing -------------------------------------------------------------------------

# One word for a POSIX shell: as is when it is plain, else in single quotes (' written as '\'').
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

# A command printed on one line for bash: words with newlines in $'...'.
show_command() {
  local out="" arg
  for arg in "$@"; do
    if [[ "$arg" == *$'\n'* ]]; then out+="$(printf '%q' "$arg") "; else out+="$(quote "$arg") "; fi
  done
  printf '%s\n' "${out% }"
}

# Run a command, or in dry-run mode print it on one line of stdout.
do_cmd() {
  if [[ "$dry_run" == 1 ]]; then
    show_command "$@"
  else
    echo "+ $*" >&2
    "$@"
  fi
}

stamp() {
  TZ=UTC printf '%(%Y%m%dT%H%M%SZ)T' -1
}

log_event() {  # a line for the user and for the run's watch log
  local line
  line="$(TZ=UTC printf '%(%Y-%m-%d %H:%M:%S)T' -1) $name: $*"
  echo "$line" >&2
  if [[ "$dry_run" != 1 ]]; then
    mkdir -p "$state_dir" && echo "$line" >> "$state_dir/$name.watch.log"
  fi
}

tpu_flags=(--zone="$zone" --project="$project")
ssh_flags=()
if [[ "$internal_ip" == 1 ]]; then ssh_flags=(--internal-ip); fi

# A command line for a worker: the text of FUNCTION and of the worker functions it calls, then
# FUNCTION ARG... under bash.
worker_call() {
  local defs need=("$1") fn found=1
  while [[ "$found" == 1 ]]; do
    found=0
    defs="$(declare -f "${need[@]}")"
    for fn in $(compgen -A function ej_); do
      if [[ " ${need[*]} " != *" $fn "* && "$defs" =~ (^|[^a-z_])$fn([^a-z_]|$) ]]; then
        need+=("$fn")
        found=1
      fi
    done
  done
  printf 'bash -c %s ej %s' "$(quote "$defs"$'\n''"$@"')" "$(join_quoted "$@")"
}

ssh_workers() {  # ssh_workers WORKERS WHAT COMMAND_LINE
  local ssh=(gcloud compute tpus tpu-vm ssh "$name" "${tpu_flags[@]}" ${ssh_flags[@]+"${ssh_flags[@]}"}
             --worker="$1" --command="$3")
  if [[ "$dry_run" == 1 ]]; then
    show_command "${ssh[@]}"
  else
    echo "+ gcloud compute tpus tpu-vm ssh $name --worker=$1: $2" >&2
    "${ssh[@]}"
  fi
}

scp_workers() {  # scp_workers SRC DEST
  do_cmd gcloud compute tpus tpu-vm scp "$1" "$name:$2" "${tpu_flags[@]}" \
    ${ssh_flags[@]+"${ssh_flags[@]}"} --worker=all
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

# ---- records (what create, setup and run did, for babysit) ---------------------------------------

save_record() {  # save_record KIND VAR...
  [[ "$dry_run" == 1 ]] && return 0
  mkdir -p "$state_dir"
  local kind="$1" v out="# written by launch_tpu.sh $cmd"$'\n'
  shift
  for v in "$@"; do
    if [[ "$(declare -p "$v")" == "declare -a"* ]]; then
      local -n arr="$v"
      out+="$v=($(join_quoted ${arr[@]+"${arr[@]}"}))"$'\n'
      unset -n arr
    else
      out+="$v=$(quote "${!v}")"$'\n'
    fi
  done
  printf '%s' "$out" > "$state_dir/$name.$kind.tmp"
  mv "$state_dir/$name.$kind.tmp" "$state_dir/$name.$kind"
}

load_record() {  # load_record KIND: 1 when there is none
  local f="$state_dir/$name.$1"
  [[ -f "$f" ]] || return 1
  # shellcheck disable=SC1090
  source "$f"
}

# ---- the TPU's state -----------------------------------------------------------------------------

# "STATE ACCELERATOR_TYPE" of the TPU VM, NONE when there is none, UNKNOWN when gcloud failed.
tpu_state() {
  local out
  if out="$(gcloud compute tpus tpu-vm describe "$name" "${tpu_flags[@]}" \
              --format='value(state,acceleratorType)' 2>&1)"; then
    echo "${out//$'\t'/ }"
  elif [[ "$out" == *NOT_FOUND* || "$out" == *"not found"* ]]; then
    echo NONE
  else
    echo "$out" >&2
    echo UNKNOWN
  fi
}

qr_state() {  # the queued resource's state, NONE or UNKNOWN
  local out
  if out="$(gcloud compute tpus queued-resources describe "$name" "${tpu_flags[@]}" \
              --format='value(state.state)' 2>&1)"; then
    echo "$out"
  elif [[ "$out" == *NOT_FOUND* || "$out" == *"not found"* ]]; then
    echo NONE
  else
    echo "$out" >&2
    echo UNKNOWN
  fi
}

check_type() {  # check_type TYPE_OF_THE_EXISTING_TPU
  [[ -z "$1" || "$1" == "$accel" ]] || die "TPU '$name' in $zone is a $1, not the $accel asked" \
    "for: delete it (launch_tpu.sh delete) or choose another --name"
}

wait_ready() {  # until the TPU VM is READY
  local st typ
  while :; do
    read -r st typ <<< "$(tpu_state)"
    case "$st" in
      READY) return 0 ;;
      CREATING|STARTING|RESTARTING|REPAIRING|PROVISIONING|UNKNOWN)
        note "TPU '$name' is $st; waiting"; sleep "$poll" ;;
      *) die "TPU '$name' is ${st}${typ:+ ($typ)} while waiting for it to be READY" ;;
    esac
  done
}

wait_active() {  # until the queued resource is ACTIVE, then its TPU VM READY
  local st last=""
  while :; do
    st="$(qr_state)"
    [[ "$st" == "$last" ]] || note "queued resource '$name': $st"
    last="$st"
    case "$st" in
      ACTIVE) wait_ready; return 0 ;;
      CREATING|ACCEPTED|WAITING_FOR_RESOURCES|PROVISIONING|UNKNOWN) sleep "$poll" ;;
      *) die "queued resource '$name' is $st (not granted; see gcloud compute tpus" \
           "queued-resources describe $name --zone=$zone)" ;;
    esac
  done
}

create_node() {
  local create=(gcloud compute tpus tpu-vm create "$name" "${tpu_flags[@]}"
                --accelerator-type="$accel" --version="$version")
  if [[ "$spot" == 1 ]]; then create+=(--spot); fi
  if [[ "$reserved" == 1 ]]; then create+=(--reserved); fi
  if [[ "$internal_ip" == 1 ]]; then create+=(--internal-ips); fi
  do_cmd "${create[@]}"
}

create_queued() {
  local create=(gcloud compute tpus queued-resources create "$name" "${tpu_flags[@]}"
                --node-id="$name" --accelerator-type="$accel" --runtime-version="$version")
  if [[ "$spot" == 1 ]]; then create+=(--spot); fi
  if [[ "$reserved" == 1 ]]; then create+=(--reserved); fi
  if [[ -n "$valid_until_duration" ]]; then
    create+=(--valid-until-duration="$valid_until_duration")
  fi
  if [[ -n "$valid_until_time" ]]; then create+=(--valid-until-time="$valid_until_time"); fi
  if [[ "$internal_ip" == 1 ]]; then create+=(--internal-ips); fi
  do_cmd "${create[@]}"
}

# Delete the TPU, through its queued resource when it has one (--force: the node with it).
delete_tpu() {
  if [[ "$queued" == 1 ]] || { [[ "$dry_run" != 1 ]] && [[ "$(qr_state)" != NONE ]]; }; then
    do_cmd gcloud compute tpus queued-resources delete "$name" "${tpu_flags[@]}" --force --quiet
  else
    do_cmd gcloud compute tpus tpu-vm delete "$name" "${tpu_flags[@]}" --quiet
  fi
}

ensure_node() {  # create_node with the existing TPU's state and type taken into account
  local st typ
  read -r st typ <<< "$(tpu_state)"
  case "$st" in
    NONE) create_node; return ;;
    UNKNOWN) die "could not describe TPU '$name' (the gcloud error is above)" ;;
  esac
  check_type "$typ"
  case "$st" in
    READY) note "reusing TPU '$name' in $zone ($typ, READY)" ;;
    CREATING|STARTING|RESTARTING|REPAIRING) wait_ready ;;
    PREEMPTED|TERMINATED) note "TPU '$name' is $st: deleting and recreating it"
      delete_tpu; create_node ;;
    STOPPED) do_cmd gcloud compute tpus tpu-vm start "$name" "${tpu_flags[@]}" ;;
    *) die "TPU '$name' is $st: try again once it settles" ;;
  esac
}

ensure_queued() {
  local st node typ
  st="$(qr_state)"
  case "$st" in
    NONE)
      [[ "$(tpu_state)" == NONE ]] || die "TPU '$name' exists without a queued resource:" \
        "delete it or leave out --queued"
      create_queued; wait_active ;;
    ACTIVE)
      read -r node typ <<< "$(tpu_state)"
      case "$node" in
        NONE|PREEMPTED|TERMINATED) note "TPU '$name' of the queued resource is $node: recreating"
          delete_tpu; create_queued; wait_active ;;
        *) check_type "$typ"; wait_ready; note "reusing TPU '$name' in $zone ($typ)" ;;
      esac ;;
    CREATING|ACCEPTED|WAITING_FOR_RESOURCES|PROVISIONING) note "already queued ($st)"; wait_active ;;
    FAILED|SUSPENDING|SUSPENDED) note "queued resource '$name' is $st: deleting and requesting again"
      delete_tpu; create_queued; wait_active ;;
    UNKNOWN) die "could not describe queued resource '$name' (the gcloud error is above)" ;;
    *) die "queued resource '$name' is $st: try again once it settles" ;;
  esac
  read -r node typ <<< "$(tpu_state)"
  check_type "$typ"
}

# ---- commands ------------------------------------------------------------------------------------

cmd_create() {
  [[ -n "$accel" ]] || die "create: missing --accelerator-type (or \$TPU_ACCELERATOR_TYPE)"
  [[ "$accel" =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] \
    || die "--accelerator-type '$accel': expected e.g. v4-32, v5p-64, v5litepod-16"
  [[ -n "$version" ]] || version="$(default_version "$accel")"
  if [[ "$dry_run" == 1 ]]; then
    if [[ "$queued" == 1 ]]; then
      do_cmd gcloud compute tpus queued-resources describe "$name" "${tpu_flags[@]}" \
        --format='value(state.state)'
      create_queued
    else
      do_cmd gcloud compute tpus tpu-vm describe "$name" "${tpu_flags[@]}" \
        --format='value(state,acceleratorType)'
      create_node
    fi
  elif [[ "$queued" == 1 ]]; then
    ensure_queued
  else
    ensure_node
  fi
  save_record tpu accel version spot queued reserved valid_until_duration valid_until_time \
    internal_ip
}

cmd_setup() {
  local root commit="" data_flag=0
  root="$(cd "$here" && pwd)"
  ssh_workers all "is a job running?" "$(worker_call ej_idle)" \
    || die "setup: a job is running on a worker (above): stop it first; nothing was changed"
  if [[ -n "$repo" ]]; then
    ref="${ref:-main}"
  else
    ref="${ref:-HEAD}"
    commit="$(git -C "$root" rev-parse --verify --quiet "$ref^{commit}")" \
      || die "--ref '$ref': not a commit of $root"
    if [[ -n "$(git -C "$root" status --porcelain)" ]]; then
      note "warning: $root has uncommitted changes or untracked files; they are not shipped" \
        "(setup ships commit ${commit:0:12} as committed)"
    fi
    # Committed files only: no venv, caches, runs or workdirs.
    local tarball="${TMPDIR:-/tmp}/explore_jax_${name}.tar.gz"
    do_cmd git -C "$root" archive --format=tar.gz -o "$tarball" "$commit"
    scp_workers "$tarball" explore_jax.tar.gz
    do_cmd rm -f "$tarball"
  fi
  # The benchmark data ships inside the package; a data folder of one's own (--data, or the
  # EXPLORE_JAX_DATA of this machine) goes to ~/explore_jax_data, which jobs there then read.
  local data_dir="${data:-${EXPLORE_JAX_DATA:-}}"
  if [[ -n "$data_dir" && -d "$data_dir" ]]; then
    data_dir="$(cd "$data_dir" && pwd)"
    local data_tar="${TMPDIR:-/tmp}/explore_jax_${name}_data.tar.gz"
    do_cmd tar -czf "$data_tar" -C "$data_dir" .
    scp_workers "$data_tar" explore_jax_data.tar.gz
    do_cmd rm -f "$data_tar"
    data_flag=1
  elif [[ -n "$data_dir" ]]; then
    note "warning: no data directory '$data_dir' (--data DIR): the workers read the data files" \
      "inside the package"
  fi
  ssh_workers all "setup" \
    "$(worker_call ej_setup "$python" "$commit" "$jax_spec" "$repo" "$ref" "$data_flag")"
  local setup_repo="$repo" setup_ref="${commit:-$ref}" setup_data="$data_dir"
  local setup_python="$python" setup_jax="$jax_spec"
  save_record setup setup_repo setup_ref setup_data setup_python setup_jax
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

# Preflight every worker, then start `python -m MODULE ...` on all of them or on none. Sets
# job_commit to the commit the workers run.
start_job() {  # start_job MODULE WORKDIR ATTEMPT
  local args=(-m "$1" --config "$config" --workdir "$2"
              --config.distributed.coordinator=auto ${extra[@]+"${extra[@]}"})
  local log="job-$run_id-$3.log" out commits
  job_commit=""
  if [[ "$dry_run" == 1 ]]; then
    ssh_workers all "preflight" "$(worker_call ej_preflight)"
  else
    out="$(ssh_workers all "preflight" "$(worker_call ej_preflight)")" \
      || { echo "$out" >&2; die "preflight failed on a worker (above): nothing was started"; }
    echo "$out" >&2
    commits="$(sed -n 's/.*: ready, commit \([^ ]*\)$/\1/p' <<< "$out" | sort -u)"
    [[ "$(wc -l <<< "$commits")" -le 1 ]] \
      || die "the workers have different code (commits $(tr '\n' ' ' <<< "$commits")): run setup"
    if [[ "$commits" != unknown ]]; then job_commit="$commits"; fi
  fi
  # shellcheck disable=SC2086
  if ! ssh_workers all "start $log" \
      "$(worker_call ej_start "$log" "${#envs[@]}" ${envs[@]+"${envs[@]}"} "${args[@]}")"; then
    ssh_workers all "stop (start failed)" "$(worker_call ej_stop 0 1)" || true
    die "the job did not start on every worker: stopped it on all of them"
  fi
}

cmd_run() {
  config="${config:-${TPU_CONFIG:-configs/grpo_qwen25_7b.py}}"
  workdir="${workdir:-${TPU_WORKDIR:-}}"
  workdir_for_run
  retries="${retries:-0}"
  run_id="$(stamp)"
  attempt=1
  restarts=0
  start_job explore_jax.train "$workdir" "$attempt"
  run_commit="$job_commit"
  note "workdir $workdir; logs: $0 logs --name $name --worker 0 -f"
  save_run_record
  if [[ "$retries" -gt 0 ]]; then
    if [[ "$dry_run" == 1 ]]; then
      note "dry run: here the launcher would watch the job (babysit, --retries $retries)"
    else
      load_recovery_records
      watch_job
    fi
  fi
}

save_run_record() {
  save_record run config workdir envs extra run_id attempt restarts run_commit retries
}

cmd_evaluate() {
  config="${config:-configs/eval_paper.py}"
  [[ -z "$retries" ]] || die "evaluate: --retries is for run (the results live on worker 0's disk)"
  [[ -n "$workdir" ]] \
    || die "evaluate: missing --workdir DIR (a directory on worker 0, where the results go)"
  # responses.jsonl is appended to as batches finish, which a gs:// object does not allow.
  [[ "$workdir" != gs://* ]] \
    || die "evaluate: workdir '$workdir': must be a directory on worker 0's disk, not gs://"
  [[ "$workdir" == /* ]] \
    || die "evaluate: workdir '$workdir': give an absolute path on worker 0, e.g. /home/me/eval"
  run_id="$(stamp)"
  start_job explore_jax.evaluate "$workdir" 1
  note "results in $workdir on worker 0"
  note "logs: $0 logs --name $name --worker 0 -f"
}

# ---- watching and recovery -----------------------------------------------------------------------

# running | finished | stopped | died:REASON | unknown, from every worker's ej_status line.
job_verdict() {
  local out rc=0 line host kind code term stopped n=0 running=0 done=0 failed=""
  out="$(gcloud compute tpus tpu-vm ssh "$name" "${tpu_flags[@]}" ${ssh_flags[@]+"${ssh_flags[@]}"} \
           --worker=all --command="$(worker_call ej_status)" 2>/dev/null)" || rc=$?
  while read -r line; do
    [[ "$line" == *"JOB "* ]] || continue
    read -r host kind code term stopped <<< "${line#*JOB }"
    n=$((n + 1))
    case "$kind" in
      running) running=$((running + 1)) ;;
      exited)
        if [[ "$stopped" == 1 ]]; then echo stopped; return; fi
        if [[ "$code" != 0 ]]; then failed+="$host exited with status $code; "
        elif [[ "$term" == 1 ]]; then failed+="$host was sent SIGTERM by the system; "
        else done=$((done + 1)); fi ;;
      none) failed+="$host has no job; " ;;
    esac
  done <<< "$out"
  if [[ -n "$failed" ]]; then echo "died:${failed%; }"
  elif [[ "$rc" == 0 && "$n" -gt 0 && "$done" == "$n" ]]; then echo finished
  elif [[ "$running" -gt 0 ]]; then echo running
  else echo unknown
  fi
}

# setup again as it was done for the run, at the commit the run's workers had.
setup_as_recorded() {
  repo="$setup_repo"
  ref="${run_commit:-$setup_ref}"
  data="$setup_data"
  python="$setup_python"
  jax_spec="$setup_jax"
  cmd_setup
}

# Bring the run back: the TPU (recreated if it has to be), the code at the run's commit, the
# same command. Returns 1 when no restart is left; a failed step leaves the next check to retry.
recover() {  # recover REASON TPU_STATE
  if [[ "$restarts" -ge "$retries" ]]; then
    log_event "$1; giving up after $retries restart(s)"
    return 1
  fi
  restarts=$((restarts + 1))
  attempt=$((attempt + 1))
  log_event "$1: restart $restarts of $retries (attempt $attempt)"
  if [[ "$2" == READY ]]; then
    ssh_workers all "stop what is left" "$(worker_call ej_stop "$grace" 0)" >&2 || true
  fi
  if [[ -n "$accel" ]]; then
    ( cmd_create ) || { log_event "attempt $attempt: create failed"; return 0; }
  fi
  ( setup_as_recorded ) || { log_event "attempt $attempt: setup failed"; return 0; }
  ( start_job explore_jax.train "$workdir" "$attempt" ) \
    || { log_event "attempt $attempt: start failed"; return 0; }
  save_run_record
  log_event "attempt $attempt started (log job-$run_id-$attempt.log, commit ${run_commit:-?})"
}

watch_job() {
  local st typ verdict
  [[ "$retries" -gt 0 ]] || note "--retries 0: watching only, no restart"
  log_event "watching run $run_id (attempt $attempt, up to $retries restart(s), every $poll s)"
  while :; do
    sleep "$poll"
    read -r st typ <<< "$(tpu_state)"
    case "$st" in
      READY) ;;
      PREEMPTED|TERMINATED|STOPPED|NONE) recover "the TPU is $st" "$st" || return 1; continue ;;
      *) log_event "TPU state $st; checking again in $poll s"; continue ;;
    esac
    verdict="$(job_verdict)"
    case "$verdict" in
      running) ;;
      finished) log_event "finished: the job exited 0 on every worker"; return 0 ;;
      stopped) log_event "stopped with launch_tpu.sh stop: not restarting"; return 0 ;;
      died:*) recover "the job ended (${verdict#died:})" READY || return 1 ;;
      *) log_event "no status from every worker; checking again in $poll s" ;;
    esac
  done
}

# The create and setup settings as they were, for a recovery; a record missing means that step
# was done by hand (no create record: a lost TPU is not recreated, only the job restarted).
load_recovery_records() {
  accel=""
  setup_repo="" setup_ref="" setup_data="" setup_python="$python" setup_jax="$jax_spec"
  load_record tpu || note "no create record for '$name' in $state_dir: a lost TPU is not" \
    "recreated"
  load_record setup || note "no setup record for '$name': a recovery ships commit" \
    "${run_commit:-HEAD} of this checkout"
}

cmd_babysit() {
  [[ "$dry_run" != 1 ]] || die "babysit: nothing to print in a dry run (it watches a live run)"
  local flag_retries="$retries"
  load_recovery_records
  load_record run || die "babysit: no run of '$name' recorded in $state_dir: start it with run"
  retries="${flag_retries:-$retries}"
  watch_job
}

# ---- the other commands --------------------------------------------------------------------------

cmd_logs() {
  local tail_cmd="tail -n 200"
  if [[ "$follow" == 1 ]]; then tail_cmd="tail -n 200 -F"; fi
  # job.log points at the newest run's log; lines carry the host so that workers stay apart.
  # shellcheck disable=SC2016
  local logs='$HOME/explore_jax_logs'
  ssh_workers "${worker:-0}" "logs" "echo \"[\$(hostname)] ==> \$(readlink $logs/job.log)\";
    $tail_cmd $logs/job.log | sed -u \"s/^/[\$(hostname)] /\""
}

cmd_stop() {
  ssh_workers "${worker:-all}" "stop" "$(worker_call ej_stop "$grace" "$force")"
}

cmd_delete() {
  delete_tpu
}

cmd_ssh() {
  if [[ ${#extra[@]} -eq 1 ]]; then
    ssh_workers "${worker:-all}" "${extra[0]}" "${extra[0]}"
  elif [[ ${#extra[@]} -gt 1 ]]; then
    ssh_workers "${worker:-all}" "${extra[*]}" "$(join_quoted "${extra[@]}")"
  else
    do_cmd gcloud compute tpus tpu-vm ssh "$name" "${tpu_flags[@]}" \
      ${ssh_flags[@]+"${ssh_flags[@]}"} --worker="${worker:-0}"
  fi
}

cmd_status() {
  do_cmd gcloud compute tpus tpu-vm describe "$name" "${tpu_flags[@]}"
}

if [[ "$dry_run" != 1 ]] && ! command -v gcloud >/dev/null; then
  die "gcloud not found: install the Google Cloud CLI, or use --dry-run"
fi
"cmd_$cmd"
