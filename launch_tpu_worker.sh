# shellcheck shell=bash
# The parts of launch_tpu.sh that run on the TPU workers. launch_tpu.sh sources this file and sends
# the text of these functions (declare -f) with each command, so a worker needs nothing installed
# beforehand. Paths live under the worker's $HOME:
#   ~/explore_jax        the code (its .launch_commit: the commit it was shipped from)
#   ~/explore_jax_venv   the venv with the locked versions of requirements/tpu.txt
#   ~/explore_jax_data   the data folder `setup --data DIR` shipped (jobs get EXPLORE_JAX_DATA)
#   ~/explore_jax_logs   job-RUN-ATTEMPT.log per start, job.log -> the newest, and the job's state:
#                        job.pid (the Python process), job.pgid (its process group), job.exit (its
#                        exit status), job.term (the system sent SIGTERM: preemption/maintenance),
#                        job.stopped (stopped with `launch_tpu.sh stop`)

ej_host() {
  hostname 2>/dev/null || echo worker
}

# The pid of the job when it is alive.
ej_job_pid() {
  local f="$HOME/explore_jax_logs/job.pid" pid
  [ -s "$f" ] || return 1
  pid="$(cat "$f")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# Root's view where we can have it (other users' TPU holders, apt locks), else our own.
ej_sudo() {
  if [ "$(id -u)" = 0 ] || ! sudo -n true 2>/dev/null; then "$@"; else sudo -n "$@"; fi
}

# Pids of the processes that hold a TPU device open (EXPLORE_JAX_TPU_DEVICES: globs, spaces between;
# the chips are /dev/accel* on v4/v5p, /dev/vfio/* on v5e/v6e; tests point it and
# EXPLORE_JAX_LIBTPU_LOCKFILE elsewhere).
ej_tpu_holders() {
  local pats match=() pat pids
  read -ra pats <<< "${EXPLORE_JAX_TPU_DEVICES:-/dev/accel* /dev/vfio/*}"
  for pat in "${pats[@]}"; do
    [ ${#match[@]} -eq 0 ] || match+=(-o)
    match+=(-lname "$pat")
  done
  pids="$(ej_sudo find /proc -mindepth 3 -maxdepth 3 -path '/proc/[0-9]*/fd/*' \
            \( "${match[@]}" \) -print 2>/dev/null | cut -d/ -f3 | sort -un)"
  # shellcheck disable=SC2086
  echo $pids  # one line, single spaces
}

# Exit 1 when this worker cannot take a job; else clear stale TPU holders and libtpu's lockfile,
# and print the commit of the code.
ej_preflight() {
  local host pid holders left="" i commit lock
  host="$(ej_host)"
  if pid="$(ej_job_pid)"; then
    echo "$host: busy: a job is running (pid $pid); stop it first"
    return 1
  fi
  if [ ! -x "$HOME/explore_jax_venv/bin/python" ] || [ ! -d "$HOME/explore_jax" ]; then
    echo "$host: not set up (no ~/explore_jax or ~/explore_jax_venv): run setup"
    return 1
  fi
  holders="$(ej_tpu_holders)"
  if [ -n "$holders" ]; then
    # No job of ours runs here, so whatever holds the chips is left from an earlier one.
    echo "$host: stale TPU holders, killing: $(ps -o pid=,args= -p "${holders// /,}" 2>/dev/null \
      | tr -s ' \n' ' ')"
    # shellcheck disable=SC2086
    ej_sudo kill -TERM $holders 2>/dev/null
    for i in $(seq 50); do
      left="$(ej_tpu_holders)"
      [ -n "$left" ] || break
      sleep 0.1
    done
    # shellcheck disable=SC2086
    if [ -n "$left" ]; then ej_sudo kill -KILL $left 2>/dev/null; sleep 0.5; fi
    left="$(ej_tpu_holders)"
    if [ -n "$left" ]; then
      echo "$host: the TPU is still held by pid $left"
      return 1
    fi
  fi
  lock="${EXPLORE_JAX_LIBTPU_LOCKFILE:-/tmp/libtpu_lockfile}"
  if [ -e "$lock" ]; then
    ej_sudo rm -f "$lock" && echo "$host: removed a stale $lock"
  fi
  commit="$(cat "$HOME/explore_jax/.launch_commit" 2>/dev/null || echo unknown)"
  echo "$host: ready, commit $commit"
}

# Run a command as a child, keeping its pid, process group and exit status in LOGS; a SIGTERM
# from outside (the system going down) is noted in job.term and the child's status still kept.
ej_supervise() {  # ej_supervise LOGS COMMAND...
  local logs="$1" pid rc again
  shift
  trap 'touch "$logs/job.term"' TERM
  echo "$$" > "$logs/job.pgid"
  "$@" &
  pid=$!
  echo "$pid" > "$logs/job.pid.tmp" && mv "$logs/job.pid.tmp" "$logs/job.pid"
  while :; do
    wait "$pid"
    rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  # A wait cut short by the trap just as the child ended: its status is still to be had.
  wait "$pid" 2>/dev/null
  again=$?
  if [ "$again" != 127 ]; then rc=$again; fi
  echo "$rc" > "$logs/job.exit"
}

# Start the job in the background, in a session of its own, logging to LOGNAME.
ej_start() {  # ej_start LOGNAME NENV KEY=VALUE... ARG...  (python ARG... under env KEY=VALUE...)
  local logs="$HOME/explore_jax_logs" log="$1" nenv="$2" host pid i
  shift 2
  host="$(ej_host)"
  mkdir -p "$logs" && cd "$HOME/explore_jax" || return 1
  if pid="$(ej_job_pid)"; then
    echo "$host: already running (pid $pid)" >&2
    return 1
  fi
  rm -f "$logs/job.pid" "$logs/job.pgid" "$logs/job.exit" "$logs/job.term" "$logs/job.stopped"
  local envs=("${@:1:$nenv}")
  shift "$nenv"
  # The data folder setup shipped (if any) first, so that a job's own --env can still override it.
  if [ -d "$HOME/explore_jax_data" ]; then
    envs=("EXPLORE_JAX_DATA=$HOME/explore_jax_data" ${envs[@]+"${envs[@]}"})
  fi
  # Two starts within a second: the later log gets a suffix rather than replacing the first.
  for i in 2 3 4 5 6 7 8 9; do
    [ -e "$logs/$log" ] || break
    log="${log%.log}.$i.log"
  done
  ln -sfn "$log" "$logs/job.log"
  setsid nohup bash -c "$(declare -f ej_supervise); ej_supervise \"\$@\"" ej "$logs" \
    env ${envs[@]+"${envs[@]}"} "$HOME/explore_jax_venv/bin/python" "$@" \
    > "$logs/$log" 2>&1 < /dev/null &
  for i in $(seq 100); do
    [ -s "$logs/job.pid" ] && break
    sleep 0.05
  done
  echo "$host: started pid $(cat "$logs/job.pid" 2>/dev/null), log ~/explore_jax_logs/$log"
}

# SIGTERM the job, SIGKILL it after GRACE seconds (at once with FORCE=1); say how it ended.
ej_stop() {  # ej_stop GRACE FORCE
  local logs="$HOME/explore_jax_logs" grace="$1" force="$2" host pid tenths=0 how rc i
  host="$(ej_host)"
  if ! pid="$(ej_job_pid)"; then
    if [ -f "$logs/job.exit" ]; then
      echo "$host: not running (the last job exited with status $(cat "$logs/job.exit"))"
    else
      echo "$host: no job"
    fi
    return 0
  fi
  touch "$logs/job.stopped"
  if [ "$force" = 1 ]; then
    kill -KILL "$pid" 2>/dev/null
    how="SIGKILL"
  else
    kill -TERM "$pid" 2>/dev/null
    how="SIGTERM"
    while kill -0 "$pid" 2>/dev/null && [ "$tenths" -lt $((grace * 10)) ]; do
      sleep 0.1
      tenths=$((tenths + 1))
    done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null
      how="SIGTERM, then SIGKILL after the ${grace} s grace period"
    fi
  fi
  for i in $(seq 100); do
    [ -f "$logs/job.exit" ] && break
    sleep 0.05
  done
  # Whatever the job started (reward workers) goes with it.
  if [ -s "$logs/job.pgid" ]; then kill -KILL -- "-$(cat "$logs/job.pgid")" 2>/dev/null; fi
  rc="$(cat "$logs/job.exit" 2>/dev/null || echo unknown)"
  echo "$host: job pid $pid exited with status $rc ($how; $((tenths / 10)).$((tenths % 10)) s)"
}

# One line for the launcher's watch: JOB HOST running | exited STATUS TERM STOPPED | none.
ej_status() {
  local logs="$HOME/explore_jax_logs" host
  host="$(ej_host)"
  if ej_job_pid > /dev/null; then
    echo "JOB $host running"
  elif [ -f "$logs/job.exit" ]; then
    echo "JOB $host exited $(cat "$logs/job.exit") $([ -f "$logs/job.term" ] && echo 1 || echo 0)" \
      "$([ -f "$logs/job.stopped" ] && echo 1 || echo 0)"
  else
    echo "JOB $host none"
  fi
}

ej_idle() {
  local pid
  if pid="$(ej_job_pid)"; then
    echo "$(ej_host): a job is running (pid $pid): stop it before setup replaces its code"
    return 1
  fi
}

# Wait for apt's locks (a fresh VM runs unattended-upgrades at boot), up to 10 minutes.
ej_wait_apt() {
  local i
  for i in $(seq 120); do
    ej_sudo fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock \
      > /dev/null 2>&1 || return 0
    [ "$i" = 1 ] && echo "$(ej_host): waiting for the dpkg lock"
    sleep 5
  done
  echo "$(ej_host): dpkg is still locked after 10 minutes"
  return 1
}

# Unpack the shipped code (or clone REPO at REF), the data, and install the locked versions.
ej_setup() {  # ej_setup PYTHON COMMIT JAX_SPEC REPO REF DATA(0/1)
  local py="$1" commit="$2" jax="$3" repo="$4" ref="$5" data="$6"
  local code="$HOME/explore_jax" venv="$HOME/explore_jax_venv" new="$HOME/explore_jax.new"
  ej_idle || return 1
  rm -rf "$new" && mkdir -p "$new" || return 1
  if [ -n "$repo" ]; then
    git clone --quiet "$repo" "$new" && git -C "$new" checkout --quiet "$ref" \
      && git -C "$new" rev-parse HEAD > "$new/.launch_commit" || return 1
  else
    tar -xzf "$HOME/explore_jax.tar.gz" -C "$new" && echo "$commit" > "$new/.launch_commit" \
      || return 1
  fi
  rm -rf "$code" && mv "$new" "$code" || return 1
  # A data folder of one's own, or none (the package's own files): never an older setup's.
  rm -rf "$HOME/explore_jax_data" || return 1
  if [ "$data" = 1 ]; then
    mkdir -p "$HOME/explore_jax_data" \
      && tar -xzf "$HOME/explore_jax_data.tar.gz" -C "$HOME/explore_jax_data" || return 1
  fi
  # Qwen2 code needs Python >= 3.11; Ubuntu 22.04 TPU images ship 3.10, so apt brings 3.11.
  if ! command -v "$py" > /dev/null; then
    ej_wait_apt || return 1
    ej_sudo apt-get -o DPkg::Lock::Timeout=600 update -qq \
      && ej_sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install \
        -y -qq "$py" "$py-venv" || return 1
  fi
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv" || return 1
  "$venv/bin/pip" install -q --upgrade pip \
    && "$venv/bin/pip" install -q -r "$code/requirements/tpu.txt" \
    && "$venv/bin/pip" install -q --no-deps -e "$code" || return 1
  if [ -n "$jax" ]; then "$venv/bin/pip" install -q "$jax" || return 1; fi
  "$venv/bin/python" -c 'import jax; print(jax.process_index(), jax.devices())'
}
