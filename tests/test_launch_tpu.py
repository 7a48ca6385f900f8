"""launch_tpu.sh: the gcloud commands its --dry-run prints (split into words by bash), and the
commands run for real against tests/fake_gcloud.py: a TPU whose workers are directories here,
where the worker scripts run against stub Pythons (a trainer that checkpoints to a fake bucket)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch_tpu.sh")
WORKER_SCRIPT = os.path.join(REPO, "launch_tpu_worker.sh")
FAKE = os.path.join(REPO, "tests", "fake_gcloud.py")
BASE = ["--project", "my-proj", "--zone", "us-central2-b", "--name", "rl-7b"]


@pytest.fixture(scope="module")
def no_gcloud_path(tmp_path_factory):
  """A PATH holding only what the dry run may use: bash and coreutils, no gcloud."""
  bin_dir = tmp_path_factory.mktemp("bin")
  for tool in ("bash", "basename", "dirname", "env"):
    os.symlink(shutil.which(tool), bin_dir / tool)
  return str(bin_dir)


def launch(args, env=None, path=None, script=SCRIPT, timeout=60):
  clean = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "FAKE_"))}
  clean.update(env or {})
  if path:
    clean["PATH"] = path
  return subprocess.run(["bash", script] + args, capture_output=True, text=True, env=clean,
                        timeout=timeout)


def split_lines(text):
  """Each line of a dry run -> its words, as bash reads them."""
  out = subprocess.run(["bash", "-c", 'while IFS= read -r line; do eval "set -- $line";'
                        ' printf "%s\\0" "$@"; printf "\\1\\0"; done'],
                       input=text, capture_output=True, text=True, check=True).stdout
  cmds, cur = [], []
  for word in out.split("\0")[:-1]:
    if word == "\1":
      cmds.append(cur)
      cur = []
    else:
      cur.append(word)
  return cmds


def dry(args, env=None, path=None):
  proc = launch([args[0], "--dry-run"] + args[1:], env, path)
  assert proc.returncode == 0, proc.stderr
  return split_lines(proc.stdout)


def flags(argv):
  """--key=value words of a command -> dict (bare flags map to True)."""
  out = {}
  for word in argv:
    if word.startswith("--"):
      key, _, value = word[2:].partition("=")
      out[key] = value or True
  return out


def gcloud(cmds, group, verb):
  found = [c for c in cmds if c[:4] == ["gcloud", "compute", "tpus", group] and c[4] == verb]
  assert found, f"no 'gcloud compute tpus {group} {verb}' in {cmds}"
  for c in found:
    # scp names the TPU in its destination (SRC NAME:DEST); the others take it as first argument.
    assert c[6].startswith("rl-7b:") if verb == "scp" else c[5] == "rl-7b", c
    f = flags(c)
    assert f["zone"] == "us-central2-b" and f["project"] == "my-proj", c
  return found


def gcloud_tpu(cmds, verb):
  return gcloud(cmds, "tpu-vm", verb)


def worker_fn(ssh):
  """The worker function an ssh command calls (the word after ' ej ')."""
  return flags(ssh)["command"].rsplit("' ej ", 1)[1].split()[0]


# ---- dry runs ------------------------------------------------------------------------------------

def test_create_prints_describe_then_create(no_gcloud_path):
  cmds = dry(["create"] + BASE + ["--accelerator-type", "v4-32", "--spot"], path=no_gcloud_path)
  assert all(c[0] == "gcloud" for c in cmds)
  (describe,) = gcloud_tpu(cmds, "describe")  # the state check runs first
  assert flags(describe)["format"] == "value(state,acceleratorType)"
  (create,) = gcloud_tpu(cmds, "create")
  f = flags(create)
  assert f["accelerator-type"] == "v4-32" and f["version"] == "tpu-ubuntu2204-base"
  assert f["spot"] is True and "internal-ips" not in f


@pytest.mark.parametrize("accel,version", [("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                           ("v5p-64", "v2-alpha-tpuv5"),
                                           ("v6e-8", "v2-alpha-tpuv6e")])
def test_runtime_version_follows_the_accelerator(accel, version):
  (create,) = gcloud_tpu(dry(["create"] + BASE + ["--accelerator-type", accel]), "create")
  assert flags(create)["version"] == version
  (create,) = gcloud_tpu(dry(["create"] + BASE + ["--accelerator-type", accel, "--version",
                                                  "my-runtime"]), "create")
  assert flags(create)["version"] == "my-runtime"


def test_environment_variables_stand_in_for_flags():
  env = {"TPU_PROJECT": "my-proj", "TPU_ZONE": "us-central2-b", "TPU_NAME": "rl-7b",
         "TPU_ACCELERATOR_TYPE": "v5p-64", "TPU_DRY_RUN": "1"}
  proc = launch(["create"], env)
  assert proc.returncode == 0, proc.stderr
  (create,) = gcloud_tpu(split_lines(proc.stdout), "create")
  assert flags(create)["accelerator-type"] == "v5p-64"


def test_queued_resource_create_and_delete_flags():
  cmds = dry(["create"] + BASE + ["--accelerator-type", "v5p-64", "--queued", "--spot",
                                  "--valid-until-duration", "6h", "--internal-ip"])
  (describe,) = gcloud(cmds, "queued-resources", "describe")
  assert flags(describe)["format"] == "value(state.state)"
  (create,) = gcloud(cmds, "queued-resources", "create")
  f = flags(create)
  assert (f["node-id"], f["accelerator-type"], f["runtime-version"]) == (
      "rl-7b", "v5p-64", "v2-alpha-tpuv5")
  assert f["spot"] is True and f["valid-until-duration"] == "6h" and f["internal-ips"] is True
  assert "reserved" not in f and "version" not in f
  f = flags(gcloud(dry(["create"] + BASE + ["--accelerator-type", "v4-8", "--queued", "--reserved",
                                            "--valid-until-time", "2027-01-01T00:00:00Z"]),
                   "queued-resources", "create")[0])
  assert f["reserved"] is True and f["valid-until-time"] == "2027-01-01T00:00:00Z"
  assert "spot" not in f
  (delete,) = gcloud(dry(["delete"] + BASE + ["--queued"]), "queued-resources", "delete")
  assert flags(delete)["force"] is True and flags(delete)["quiet"] is True


def test_internal_ip_reaches_every_ssh_and_scp(tmp_path):
  cmds = dry(["setup"] + BASE + ["--internal-ip", "--data", str(tmp_path)])
  for c in gcloud_tpu(cmds, "ssh") + gcloud_tpu(cmds, "scp"):
    assert flags(c)["internal-ip"] is True, c
  for args in (["logs"], ["stop"], ["ssh", "--", "nproc"]):
    (ssh,) = gcloud_tpu(dry(args[:1] + BASE + ["--internal-ip"] + args[1:]), "ssh")
    assert flags(ssh)["internal-ip"] is True
  assert "internal-ip" not in flags(gcloud_tpu(dry(["stop"] + BASE), "ssh")[0])
  (create,) = gcloud_tpu(dry(["create"] + BASE + ["--accelerator-type", "v4-8", "--internal-ip"]),
                         "create")
  assert flags(create)["internal-ips"] is True


def test_setup_checks_for_a_job_then_ships_the_commit_and_installs_the_lock(tmp_path):
  data = tmp_path / "data"
  (data / "math500").mkdir(parents=True)
  (data / "math500" / "test.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
  cmds = dry(["setup"] + BASE, env={"TMPDIR": str(tmp_path), "TPU_DATA": str(data)})
  idle, install = gcloud_tpu(cmds, "ssh")
  assert cmds.index(idle) == 0 and worker_fn(idle) == "ej_idle"  # before anything is shipped
  (archive,) = (c for c in cmds if c[0] == "git")
  head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True,
                        check=True).stdout.strip()
  assert archive[3:] == ["archive", "--format=tar.gz", "-o", archive[6], head]
  code_scp, data_scp = gcloud_tpu(cmds, "scp")
  assert code_scp[5] == archive[6] and code_scp[6] == "rl-7b:explore_jax.tar.gz"
  assert data_scp[6] == "rl-7b:explore_jax_data.tar.gz"
  assert flags(code_scp)["worker"] == flags(install)["worker"] == "all"
  # The install call: python, the commit, no JAX override, no repo, the ref, data shipped.
  assert flags(install)["command"].endswith(f"' ej ej_setup python3.11 {head} '' '' HEAD 1")
  assert "--jax" not in " ".join(install)
  # The archive holds the committed files only.
  subprocess.run(archive, check=True, timeout=60)
  with tarfile.open(archive[6]) as tf:
    names = set(tf.getnames())
  assert {"pyproject.toml", "explore_jax/tpu/memory.py", "launch_tpu.sh", "requirements/tpu.txt",
          "launch_tpu_worker.sh"} <= names
  assert not any(n.startswith((".venv", ".git/", "runs/", ".cache/")) for n in names)
  # A data directory that is not there: a warning, and only the code is shipped.
  proc = launch(["setup", "--dry-run"] + BASE, env={"TPU_DATA": str(tmp_path / "none")})
  assert proc.returncode == 0 and "no data directory" in proc.stderr
  assert len(gcloud_tpu(split_lines(proc.stdout), "scp")) == 1
  # None asked for: the package's own data files; nothing to say, nothing but the code shipped.
  proc = launch(["setup", "--dry-run"] + BASE, env={"EXPLORE_JAX_DATA": ""})
  assert proc.returncode == 0 and "data" not in proc.stderr
  cmds = split_lines(proc.stdout)
  assert len(gcloud_tpu(cmds, "scp")) == 1
  assert flags(gcloud_tpu(cmds, "ssh")[1])["command"].endswith(" HEAD 0")


def test_jobs_read_the_data_folder_that_setup_shipped(tmp_path):
  home = tmp_path / "home"
  (home / "explore_jax").mkdir(parents=True)
  (home / "explore_jax_venv" / "bin").mkdir(parents=True)
  python = home / "explore_jax_venv" / "bin" / "python"
  python.write_text('#!/bin/bash\necho "${EXPLORE_JAX_DATA-unset} $*" > "$HOME/seen"\n')
  python.chmod(0o755)

  def start(*envs):
    (home / "seen").unlink(missing_ok=True)
    subprocess.run(["bash", "-c", f'source {WORKER_SCRIPT}; ej_start job-1.log {len(envs)} "$@"',
                    "ej", *envs, "-m", "explore_jax.train"], check=True, capture_output=True,
                   env=dict(os.environ, HOME=str(home)), timeout=30)
    wait_for(lambda: (home / "seen").exists() and (home / "seen").read_text(), "the job")
    return (home / "seen").read_text().strip()

  assert start() == "unset -m explore_jax.train"  # no folder shipped: the package's own files
  (home / "explore_jax_data").mkdir()
  assert start() == f"{home}/explore_jax_data -m explore_jax.train"
  assert start("EXPLORE_JAX_DATA=/mine") == "/mine -m explore_jax.train"  # --env still wins


def test_setup_from_a_git_url_clones_at_the_ref(tmp_path):
  cmds = dry(["setup"] + BASE + ["--repo", "https://example.com/me/explore_jax.git",
                                 "--ref", "v1.2", "--data", str(tmp_path), "--jax",
                                 "jax[tpu]==0.11.0"])
  assert not [c for c in cmds if c[0] == "git"]  # only the data travels from here
  (scp,) = gcloud_tpu(cmds, "scp")
  assert scp[6] == "rl-7b:explore_jax_data.tar.gz"
  install = flags(gcloud_tpu(cmds, "ssh")[1])["command"]
  assert install.endswith("ej_setup python3.11 '' 'jax[tpu]==0.11.0' "
                          "https://example.com/me/explore_jax.git v1.2 1")


RUN_ARGS = BASE + ["--bucket", "gs://bkt/exp/",
                   "--config", "configs/ppo_qwen25_7b.py:variant=baseline",
                   "--env", "TPU_STDERR_LOG_LEVEL=2", "--", "--config.seed=3",
                   "--config.rl.note=it's quoted"]
TRAIN_ARGV = ["-m", "explore_jax.train", "--config", "configs/ppo_qwen25_7b.py:variant=baseline",
              "--workdir", "gs://bkt/exp/rl-7b/ppo_qwen25_7b-variant=baseline",
              "--config.distributed.coordinator=auto", "--config.seed=3",
              "--config.rl.note=it's quoted"]


def start_words(ssh):
  """The words ej_start gets: LOGNAME NENV ENV... ARGS..."""
  words = flags(ssh)["command"].rsplit("' ej ", 1)[1]
  out = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "x", words],
                       capture_output=True, text=True, check=True).stdout
  return out.split("\0")[:-1]


def test_run_preflights_then_starts_the_trainer_on_all_workers():
  cmds = dry(["run"] + RUN_ARGS)
  preflight, start = gcloud_tpu(cmds, "ssh")
  assert worker_fn(preflight) == "ej_preflight" and flags(preflight)["worker"] == "all"
  assert flags(start)["worker"] == "all"
  words = start_words(start)
  assert words[0] == "ej_start" and words[1].startswith("job-") and words[1].endswith("-1.log")
  assert words[2:] == ["1", "TPU_STDERR_LOG_LEVEL=2"] + TRAIN_ARGV
  explicit = start_words(gcloud_tpu(dry(["run"] + BASE + ["--workdir", "gs://other/w"]), "ssh")[1])
  assert explicit[explicit.index("--workdir") + 1] == "gs://other/w"


def test_evaluate_starts_the_evaluator_with_a_local_workdir():
  ssh = gcloud_tpu(dry(["evaluate"] + BASE + ["--workdir", "/home/me/eval", "--",
                                                "--config.model=/data/ckpt"]), "ssh")[1]
  assert start_words(ssh)[2:] == ["0", "-m", "explore_jax.evaluate", "--config",
                                  "configs/eval_paper.py", "--workdir", "/home/me/eval",
                                  "--config.distributed.coordinator=auto",
                                  "--config.model=/data/ckpt"]
  # The trainer's config and workdir variables do not leak into an evaluation.
  env = {"TPU_CONFIG": "configs/grpo_qwen25_7b.py", "TPU_WORKDIR": "gs://bkt/run"}
  words = start_words(gcloud_tpu(dry(["evaluate"] + BASE + ["--workdir", "/e"], env=env),
                                 "ssh")[1])
  assert words[words.index("--config") + 1] == "configs/eval_paper.py"
  words = start_words(gcloud_tpu(dry(["run"] + BASE, env=env), "ssh")[1])
  assert words[words.index("--workdir") + 1] == "gs://bkt/run"


def test_logs_stop_delete_and_worker_selection():
  (logs,) = gcloud_tpu(dry(["logs"] + BASE + ["--worker", "3", "--follow"]), "ssh")
  assert flags(logs)["worker"] == "3" and "tail -n 200 -F $HOME/explore_jax_logs/job.log" in (
      flags(logs)["command"])
  (stop,) = gcloud_tpu(dry(["stop"] + BASE + ["--force"]), "ssh")
  assert flags(stop)["worker"] == "all" and flags(stop)["command"].endswith("ej_stop 300 1")
  (stop,) = gcloud_tpu(dry(["stop"] + BASE + ["--grace", "20", "--worker", "1"]), "ssh")
  assert flags(stop)["worker"] == "1" and flags(stop)["command"].endswith("ej_stop 20 0")
  (delete,) = gcloud_tpu(dry(["delete"] + BASE), "delete")
  assert flags(delete)["quiet"] is True
  (status,) = gcloud_tpu(dry(["status"] + BASE), "describe")
  (cmd,) = gcloud_tpu(dry(["ssh"] + BASE + ["--worker", "1,2", "--", "nproc"]), "ssh")
  assert flags(cmd)["worker"] == "1,2" and flags(cmd)["command"] == "nproc"


@pytest.mark.parametrize("args,message", [
    (["frobnicate"] + BASE, "unknown command 'frobnicate'"),
    (["create", "--zone", "z", "--name", "n", "--accelerator-type", "v4-8"], "missing --project"),
    (["create", "--project", "p", "--name", "n"], "missing --zone"),
    (["create", "--project", "p", "--zone", "z"], "missing --name"),
    (["create"] + BASE, "missing --accelerator-type"),
    (["create"] + BASE + ["--accelerator-type", "h100"], "--accelerator-type 'h100'"),
    (["create"] + BASE + ["--accelerator-type", "v9-8"], "no default --version"),
    (["create"] + BASE + ["--accelerator-type", "v4-8", "--spot", "--reserved"],
     "--spot and --reserved exclude each other"),
    (["create"] + BASE + ["--accelerator-type", "v4-8", "--valid-until-duration", "1h"],
     "need --queued"),
    (["create"] + BASE + ["--queued", "--valid-until-duration", "1h", "--valid-until-time", "t"],
     "give one of --valid-until-duration and --valid-until-time"),
    (["run"] + BASE, "missing --workdir"),
    (["run"] + BASE + ["--workdir", "/tmp/local"], "must be a gs:// path"),
    (["run"] + BASE + ["--workdir", "gs://b/w", "--retries", "many"], "--retries 'many'"),
    (["stop"] + BASE + ["--grace", "1.5"], "--grace '1.5'"),
    (["run"] + BASE + ["--bogus", "1"], "unknown argument '--bogus'"),
    (["evaluate"] + BASE, "evaluate: missing --workdir"),
    (["evaluate"] + BASE + ["--workdir", "/e", "--retries", "2"], "--retries is for run"),
    (["evaluate"] + BASE + ["--workdir", "gs://b/eval"], "not gs://"),
    (["evaluate"] + BASE + ["--workdir", "eval"], "give an absolute path"),
    (["babysit"] + BASE, "babysit: nothing to print in a dry run"),
    (["run"] + BASE + ["--zone=z"], "use '--zone VALUE'"),
    (["run"] + BASE + ["--config"], "flag --config needs a value"),
    (["create", "--project", "p", "--zone", "z", "--name", "Bad_Name"], "--name 'Bad_Name'"),
])
def test_bad_input_fails_with_a_clear_message(args, message):
  proc = launch(args[:1] + ["--dry-run"] + args[1:])
  assert proc.returncode != 0 and proc.stdout == ""
  assert message in proc.stderr, proc.stderr


def test_help_and_no_arguments():
  proc = launch(["--help"])
  assert proc.returncode == 0 and "usage: launch_tpu.sh" in proc.stdout
  assert "--accelerator-type" in proc.stdout and "babysit" in proc.stdout
  assert launch([]).returncode != 0


def test_real_mode_without_gcloud_says_so(no_gcloud_path):
  proc = launch(["delete"] + BASE, path=no_gcloud_path)
  assert proc.returncode != 0 and "gcloud not found" in proc.stderr


def test_bash_syntax_and_shellcheck():
  for script in (SCRIPT, WORKER_SCRIPT):
    assert subprocess.run(["bash", "-n", script]).returncode == 0
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not installed")
  proc = subprocess.run(["shellcheck", "-x", SCRIPT, WORKER_SCRIPT], capture_output=True,
                        text=True, cwd=REPO)
  assert proc.returncode == 0, proc.stdout


# ---- against the fake gcloud ---------------------------------------------------------------------

TRAINER = r"""#!/bin/bash
# The venv's python on a fake worker: `-c` checks pass; the trainer resumes from the step in its
# fake-bucket workdir, counts to --config.total_steps (default 6), saves and exits 0 on SIGTERM.
if [ "$1" = -c ]; then echo "$FAKE_WORKER [FakeTpuDevice(id=0)]"; exit 0; fi
total=6 prev="" workdir=""
for a in "$@"; do
  case "$a" in --config.total_steps=*) total="${a#*=}" ;; esac
  [ "$prev" = --workdir ] && workdir="$a"
  prev="$a"
done
ckpt="$FAKE_GCLOUD/bucket/${workdir#gs://}"
mkdir -p "$ckpt" "$FAKE_GCLOUD/starts"
start="$(cat "$ckpt/step" 2>/dev/null || echo 0)"
printf '%s\0' "$PWD" "${TPU_STDERR_LOG_LEVEL-}" "$@" > "$FAKE_GCLOUD/starts/w$FAKE_WORKER-from$start"
echo "resuming from step $start"
# Like jax.distributed.initialize: wait for every worker, so that all resume from one step.
touch "$ckpt/up-$start-w$FAKE_WORKER"
while [ "$(ls "$ckpt" | grep -c "^up-$start-")" -lt "$FAKE_WORKERS" ]; do sleep 0.02; done
s="$start"
trap 'echo "SIGTERM at step $s"; [ "${FAKE_IGNORE_TERM:-}" = 1 ] || exit 0' TERM
if [ -f "$FAKE_GCLOUD/crash-w$FAKE_WORKER" ]; then
  while [ ! -f "$FAKE_GCLOUD/held-w0" ]; do sleep 0.02; done
  rm -f "$FAKE_GCLOUD/crash-w$FAKE_WORKER"
  echo "worker $FAKE_WORKER: crashed"
  exit 1
fi
for ((s = start + 1; s <= total; s++)); do
  echo "step $s"
  if [ "$FAKE_WORKER" = 0 ]; then echo "$s" > "$ckpt/step"; fi
  if [ "$s" = 3 ] && [ "$start" = 0 ] && [ -f "$FAKE_GCLOUD/hold" ]; then
    touch "$FAKE_GCLOUD/held-w$FAKE_WORKER"
    while :; do sleep 0.05; done
  fi
  sleep 0.01
done
echo "finished at step $total"
"""

PIP = """#!/bin/bash
echo "$*" >> "$HOME/pip.log"
"""

VENV_PYTHON = """#!/bin/bash
# python3.11 of a fake worker: only `-m venv DIR`, with the stub trainer and pip inside.
[ "$1 $2" = "-m venv" ] || { echo "fake python3.11: $*" >&2; exit 1; }
mkdir -p "$3/bin"
cp "$FAKE_GCLOUD/stubs/trainer" "$3/bin/python"
cp "$FAKE_GCLOUD/stubs/pip" "$3/bin/pip"
"""


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
  """A small git checkout holding the launcher, with one commit (and later, uncommitted edits)."""
  root = tmp_path_factory.mktemp("checkout")
  for path in ("launch_tpu.sh", "launch_tpu_worker.sh", "requirements/tpu.txt"):
    os.makedirs(root / os.path.dirname(path), exist_ok=True)
    shutil.copy(os.path.join(REPO, path), root / path)
  (root / "pyproject.toml").write_text("[project]\nname = 'explore_jax'\n")
  (root / ".gitignore").write_text("/runs/\n")
  git = ["git", "-C", str(root), "-c", "user.email=t@example.com", "-c", "user.name=t"]
  subprocess.run(git + ["init", "-q"], check=True)
  subprocess.run(git + ["add", "."], check=True)
  subprocess.run(git + ["commit", "-qm", "launcher"], check=True)
  (root / "runs").mkdir()
  (root / "runs" / "big.ckpt").write_text("ignored")
  (root / "pyproject.toml").write_text("[project]\nname = 'edited'\n")  # not committed
  return root, git


def head(git):
  return subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                        check=True).stdout.strip()


class Fake:
  """The fake gcloud's world, the launcher run against it, and what it saw."""

  def __init__(self, tmp_path, checkout, workers=2, node=None):
    self.root, self.checkout, self.git = tmp_path / "gcloud", checkout[0], checkout[1]
    self.head = head(self.git)
    stubs = self.root / "stubs"
    stubs.mkdir(parents=True)
    for name, text in (("trainer", TRAINER), ("pip", PIP), ("python3.11", VENV_PYTHON),
                       ("hostname", "#!/bin/bash\necho fake-w$FAKE_WORKER\n")):
      (stubs / name).write_text(text)
      (stubs / name).chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(f'#!/bin/sh\nexec {sys.executable} -S {FAKE} "$@"\n')
    (bin_dir / "gcloud").chmod(0o755)
    self.env = {"FAKE_GCLOUD": str(self.root), "PATH": f"{bin_dir}:{os.environ['PATH']}",
                "TPU_STATE_DIR": str(tmp_path / "state"), "TPU_POLL": "0.1",
                "TPU_DATA": str(tmp_path / "no-data"), "TMPDIR": str(tmp_path)}
    self.set_world(node=node, qr=None, workers=workers, script=[], qr_script=[])
    if node:
      for i in range(workers):
        (self.root / f"w{i}").mkdir()
        (self.root / f"w{i}" / "dev-accel0").touch()

  def set_world(self, **changes):
    path = self.root / "world.json"
    world = json.loads(path.read_text()) if path.exists() else {}
    world.update(changes)
    path.write_text(json.dumps(world))

  def world(self):
    return json.loads((self.root / "world.json").read_text())

  def run(self, args, check=True, timeout=60):
    proc = launch(args[:1] + BASE + args[1:], self.env,
                  script=str(self.checkout / "launch_tpu.sh"), timeout=timeout)
    if check:
      assert proc.returncode == 0, proc.stderr
    return proc

  def calls(self, clear=True):
    path = self.root / "calls.jsonl"
    if not path.exists():
      return []
    calls = [json.loads(line)["what"] for line in path.read_text().splitlines()]
    if clear:
      path.unlink()
    return calls

  def home(self, i):
    return self.root / f"w{i}"

  def starts(self):
    out = {}
    for path in sorted((self.root / "starts").iterdir()):
      out[path.name] = path.read_text().split("\0")[:-1]
    return out

  def kill_jobs(self):
    for i in range(self.world()["workers"]):
      pgid = self.home(i) / "explore_jax_logs" / "job.pgid"
      if pgid.exists():
        try:
          os.killpg(int(pgid.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
          pass


@pytest.fixture
def fake(tmp_path, checkout):
  made = []

  def make(**kwargs):
    made.append(Fake(tmp_path, checkout, **kwargs))
    return made[-1]

  yield make
  for f in made:
    f.kill_jobs()


def wait_for(predicate, what, timeout=20):
  deadline = time.time() + timeout
  while not predicate():
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.02)


def test_create_checks_the_state_and_type_of_an_existing_tpu(fake):
  create = ["create", "--accelerator-type", "v4-8"]
  f = fake()
  f.run(create)  # none yet: created
  assert f.calls() == ["tpu-vm describe", "tpu-vm create"] and f.world()["node"] == {
      "state": "READY", "type": "v4-8"}
  f.run(create)  # READY, same type: reused
  assert f.calls() == ["tpu-vm describe"]
  f.set_world(script=["PREEMPTED"])
  proc = f.run(create)  # preempted: deleted and created again (no queued resource to go through)
  assert "PREEMPTED: deleting and recreating" in proc.stderr
  assert f.calls() == ["tpu-vm describe", "queued-resources describe", "tpu-vm delete",
                       "tpu-vm create"]
  f.set_world(script=["STOPPED"])
  f.run(create)
  assert f.calls() == ["tpu-vm describe", "tpu-vm start"]
  proc = f.run(["create", "--accelerator-type", "v4-32"], check=False)
  assert proc.returncode == 2 and "is a v4-8, not the v4-32 asked for" in proc.stderr
  assert f.calls() == ["tpu-vm describe"]
  f.set_world(script=["DELETING"])
  proc = f.run(create, check=False)
  assert proc.returncode == 2 and "is DELETING: try again" in proc.stderr


def test_create_through_a_queued_resource_waits_until_active_and_deletes_through_it(fake):
  f = fake()
  f.set_world(qr_script=["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
  proc = f.run(["create", "--accelerator-type", "v5litepod-16", "--queued", "--spot"])
  assert "queued resource 'rl-7b': PROVISIONING" in proc.stderr
  assert f.calls() == ["queued-resources describe", "tpu-vm describe", "queued-resources create"] \
      + ["queued-resources describe"] * 3 + ["tpu-vm describe"] * 2
  assert f.world()["node"] == {"state": "READY", "type": "v5litepod-16"}
  # Preempted under its queued resource: the request is deleted (with the node) and made again.
  f.set_world(script=["PREEMPTED"], qr_script=["ACTIVE", "ACTIVE"])
  f.run(["create", "--accelerator-type", "v5litepod-16", "--queued", "--spot"])
  calls = f.calls()
  assert calls[:3] == ["queued-resources describe", "tpu-vm describe", "queued-resources delete"]
  assert calls[3] == "queued-resources create" and f.world()["node"]["state"] == "READY"
  # A request that failed (e.g. past --valid-until) ends create with its state.
  f.set_world(node=None, qr={"state": "WAITING_FOR_RESOURCES", "type": "v4-8"},
              qr_script=["WAITING_FOR_RESOURCES", "FAILED"])
  proc = f.run(["create", "--accelerator-type", "v4-8", "--queued"], check=False)
  assert proc.returncode == 2 and "already queued (WAITING_FOR_RESOURCES)" in proc.stderr
  assert "queued resource 'rl-7b' is FAILED (not granted" in proc.stderr
  # delete finds the queued resource by itself and goes through it.
  f.calls()
  f.set_world(qr={"state": "ACTIVE", "type": "v4-8"}, node={"state": "READY", "type": "v4-8"})
  f.run(["delete"])
  assert f.calls() == ["queued-resources describe", "queued-resources delete"]
  assert f.world()["qr"] is None and f.world()["node"] is None


def test_setup_ships_committed_files_installs_the_lock_and_refuses_while_a_job_runs(fake):
  f = fake(node={"state": "READY", "type": "v4-8"})
  proc = f.run(["setup"])
  assert "uncommitted changes or untracked files; they are not shipped" in proc.stderr
  assert f.calls() == ["tpu-vm ssh:ej_idle", "tpu-vm scp", "tpu-vm ssh:ej_setup"]
  for i in (0, 1):
    code = f.home(i) / "explore_jax"
    assert (code / ".launch_commit").read_text().strip() == f.head
    assert (code / "pyproject.toml").read_text() == "[project]\nname = 'explore_jax'\n"
    assert not (code / "runs").exists() and not (code / ".git").exists()
    pip = (f.home(i) / "pip.log").read_text().splitlines()
    assert pip == ["install -q --upgrade pip",
                   f"install -q -r {f.home(i)}/explore_jax/requirements/tpu.txt",
                   f"install -q --no-deps -e {f.home(i)}/explore_jax"]
  f.run(["run", "--workdir", "gs://b/w", "--", "--config.total_steps=100000"])
  f.calls()
  proc = f.run(["setup"], check=False)
  assert proc.returncode == 2 and "fake-w0: a job is running (pid" in proc.stdout
  assert "stop it first; nothing was changed" in proc.stderr
  assert f.calls() == ["tpu-vm ssh:ej_idle"]


def test_setup_waits_for_the_dpkg_lock(tmp_path):
  # fuser finds the lock held twice, then free; sleep is skipped.
  (tmp_path / "fuser").write_text('#!/bin/bash\nn=$(cat "$0.n" 2>/dev/null || echo 0)\n'
                                  'echo $((n + 1)) > "$0.n"\n[ "$n" -lt 2 ]\n')
  (tmp_path / "fuser").chmod(0o755)
  proc = subprocess.run(["bash", "-c", f"source {WORKER_SCRIPT}; sleep() {{ :; }}; ej_wait_apt"],
                        capture_output=True, text=True,
                        env=dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}"))
  assert proc.returncode == 0 and "waiting for the dpkg lock" in proc.stdout
  assert (tmp_path / "fuser.n").read_text().strip() == "3"


def test_run_preflight_clears_stale_holders_and_starts_everywhere_or_nowhere(fake):
  f = fake(node={"state": "READY", "type": "v4-8"})
  f.run(["setup"])
  # A stale process holds worker 1's TPU, and a lockfile is left on worker 0.
  holder = subprocess.Popen(["bash", "-c", f"exec 3<{f.home(1)}/dev-accel0; exec sleep 60"])
  (f.home(0) / "libtpu_lockfile").touch()
  try:
    wait_for(lambda: any(os.readlink(f"/proc/{holder.pid}/fd/{fd}").endswith("dev-accel0")
                         for fd in os.listdir(f"/proc/{holder.pid}/fd")), "the holder")
    f.calls()
    (f.root / "hold").touch()  # the jobs stay at step 3
    proc = f.run(["run"] + RUN_ARGS[6:])
    assert holder.wait(timeout=10) == -signal.SIGTERM
  finally:
    holder.kill()
  assert "fake-w1: stale TPU holders, killing: " in proc.stderr and "sleep 60" in proc.stderr, proc.stderr
  assert "fake-w0: removed a stale" in proc.stderr and not (f.home(0) / "libtpu_lockfile").exists()
  assert f.calls() == ["tpu-vm ssh:ej_preflight", "tpu-vm ssh:ej_start"]
  wait_for(lambda: len(list((f.root / "starts").glob("*"))) == 2, "both starts")
  for i in (0, 1):
    assert f.starts()[f"w{i}-from0"] == [str(f.home(i) / "explore_jax"), "2"] + TRAIN_ARGV
  # Recorded: the commit the workers run.
  record = (f.root.parent / "state" / "rl-7b.run").read_text()
  assert f"run_commit={f.head}" in record and "retries=0" in record
  # Worker 1's job dies, worker 0's runs on: a second run starts nowhere.
  os.kill(int((f.home(1) / "explore_jax_logs" / "job.pid").read_text()), signal.SIGKILL)
  wait_for(lambda: (f.home(1) / "explore_jax_logs" / "job.exit").exists(), "worker 1's end")
  proc = f.run(["run"] + RUN_ARGS[6:], check=False)
  assert proc.returncode == 2 and "fake-w0: busy: a job is running" in proc.stderr
  assert "fake-w1: ready" in proc.stderr and "nothing was started" in proc.stderr
  assert f.calls() == ["tpu-vm ssh:ej_preflight"]
  assert (f.home(1) / "explore_jax_logs" / "job.exit").exists()  # a start would clear it


def test_per_run_logs_and_stop_with_escalation(fake):
  f = fake(node={"state": "READY", "type": "v4-8"}, workers=1)
  f.run(["setup"])
  logs = f.home(0) / "explore_jax_logs"
  f.run(["run", "--workdir", "gs://b/w1", "--", "--config.total_steps=2"])
  wait_for(lambda: (logs / "job.exit").exists(), "the first run")
  first = os.readlink(logs / "job.log")
  (f.root / "hold").touch()
  f.run(["run", "--workdir", "gs://b/w2", "--env", "FAKE_IGNORE_TERM=1", "--",
         "--config.total_steps=3"])
  wait_for(lambda: (f.root / "held-w0").exists(), "the second run to hold")
  second = os.readlink(logs / "job.log")
  # Each run its own log (a second start within the same second gets a suffix).
  assert first != second and first.startswith("job-") and "-1." in second
  assert "finished at step 2" in (logs / first).read_text()  # the first log is kept
  out = f.run(["logs"]).stdout
  assert f"[fake-w0] ==> {second}" in out and "[fake-w0] step 3" in out
  assert "finished at step 2" not in out
  # The job ignores SIGTERM: after the grace period it is killed, and stop says so.
  t0 = time.time()
  proc = f.run(["stop", "--grace", "1"])
  assert 1 <= time.time() - t0 < 10
  assert ("fake-w0: job pid " in proc.stdout and "exited with status 137 (SIGTERM, then SIGKILL "
          "after the 1 s grace period" in proc.stdout), proc.stdout
  assert "SIGTERM at step 3" in (logs / second).read_text()
  assert "not running (the last job exited with status 137)" in f.run(["stop"]).stdout
  # A job that handles SIGTERM exits within the grace period with its own status.
  f.run(["run", "--workdir", "gs://b/w3", "--", "--config.total_steps=1000"])
  wait_for(lambda: "step 2" in (logs / "job.log").read_text(), "the third run")
  proc = f.run(["stop"])
  assert "exited with status 0 (SIGTERM; 0." in proc.stdout, proc.stdout


def test_ssh_keeps_the_quoting_of_each_word(fake):
  f = fake(node={"state": "READY", "type": "v4-8"}, workers=1)
  proc = f.run(["ssh", "--", "printf", "<%s>", "a b", "it's", "$HOME"])
  assert proc.stdout == "<a b><it's><$HOME>"
  proc = f.run(["ssh", "--", "echo x | tr x y"])  # one word: a command line for the shell
  assert proc.stdout == "y\n"


def test_recovery_after_a_preemption_recreates_sets_up_and_resumes(fake):
  """describe answers PREEMPTED -> delete -> create -> setup at the run's commit -> the same
  command again, resuming from the checkpoint; then it finishes and is not restarted."""
  f = fake()
  f.run(["create", "--accelerator-type", "v4-8", "--spot"])
  f.run(["setup"])
  # Work goes on in the checkout: a recovery must still ship the commit the run's workers had.
  (f.checkout / "later.txt").write_text("later")
  subprocess.run(f.git + ["add", "later.txt"], check=True)
  subprocess.run(f.git + ["commit", "-qm", "later"], check=True)
  assert head(f.git) != f.head
  f.calls()
  (f.root / "hold").touch()  # the first attempt stops at step 3 until the TPU goes
  f.set_world(script=[{"state": "PREEMPTED", "when": ["held-w0", "held-w1"]}])
  proc = f.run(["run", "--workdir", "gs://b/run", "--retries", "2"], timeout=60)
  calls = f.calls()
  pre = calls.index("tpu-vm describe", calls.index("tpu-vm ssh:ej_start"))
  assert calls[:2] == ["tpu-vm ssh:ej_preflight", "tpu-vm ssh:ej_start"]
  recovery = calls[calls.index("tpu-vm delete") - 3:calls.index("tpu-vm ssh:ej_start", pre) + 1]
  assert recovery == ["tpu-vm describe",  # PREEMPTED
                      "tpu-vm describe", "queued-resources describe", "tpu-vm delete",
                      "tpu-vm create", "tpu-vm ssh:ej_idle", "tpu-vm scp", "tpu-vm ssh:ej_setup",
                      "tpu-vm ssh:ej_preflight", "tpu-vm ssh:ej_start"], calls
  assert calls.count("tpu-vm create") == 1 and calls.count("tpu-vm ssh:ej_start") == 2
  assert "the TPU is PREEMPTED: restart 1 of 2 (attempt 2)" in proc.stderr
  assert "finished: the job exited 0 on every worker" in proc.stderr
  # Both attempts ran the same command; the second resumed from the checkpoint of the first.
  starts = f.starts()
  assert sorted(starts) == ["w0-from0", "w0-from3", "w1-from0", "w1-from3"]
  assert starts["w0-from0"] == starts["w0-from3"] and starts["w1-from0"] == starts["w1-from3"]
  assert (f.root / "bucket" / "b" / "run" / "step").read_text().strip() == "6"
  # The new VM got the recorded commit, and its log is attempt 2's.
  assert (f.home(1) / "explore_jax" / ".launch_commit").read_text().strip() == f.head
  assert not (f.home(1) / "explore_jax" / "later.txt").exists()
  assert os.readlink(f.home(1) / "explore_jax_logs" / "job.log").endswith("-2.log")
  watch = (f.root.parent / "state" / "rl-7b.watch.log").read_text()
  assert "attempt 2 started" in watch and "finished" in watch


def test_babysit_restarts_a_dead_job_without_recreating_and_honours_stop(fake):
  f = fake()
  f.run(["create", "--accelerator-type", "v4-8"])
  f.run(["setup"])
  (f.root / "hold").touch()
  (f.root / "crash-w1").touch()  # worker 1 dies once worker 0 is at step 3
  f.run(["run", "--workdir", "gs://b/run2"])  # no watch: babysit picks the record up
  f.calls()
  proc = f.run(["babysit", "--retries", "1"], timeout=60)
  assert "the job ended (fake-w1 exited with status 1): restart 1 of 1" in proc.stderr
  calls = f.calls()
  assert "tpu-vm create" not in calls and "tpu-vm delete" not in calls
  assert calls.count("tpu-vm ssh:ej_stop") == 1 and calls.count("tpu-vm ssh:ej_setup") == 1
  # Worker 0 was stopped (SIGTERM: it saved step 3), then both resumed there and finished.
  logs = sorted((f.home(0) / "explore_jax_logs").glob("job-*.log"))
  assert [p.name[-6:] for p in logs] == ["-1.log", "-2.log"]
  assert "SIGTERM at step 3" in logs[0].read_text()
  assert "resuming from step 3" in logs[1].read_text() and "finished at step 6" in (
      logs[1].read_text())
  assert sorted(f.starts()) == ["w0-from0", "w0-from3", "w1-from0", "w1-from3"]
  # A finished job is left alone; so is one stopped by hand, however many restarts remain.
  proc = f.run(["babysit", "--retries", "3"])
  assert "finished" in proc.stderr and f.calls().count("tpu-vm ssh:ej_start") == 0
  f.run(["run", "--workdir", "gs://b/run3", "--", "--config.total_steps=1000"])
  f.run(["stop"])
  proc = f.run(["babysit", "--retries", "3"])
  assert "stopped with launch_tpu.sh stop: not restarting" in proc.stderr
  assert f.calls().count("tpu-vm ssh:ej_start") == 1  # only the run's own start
