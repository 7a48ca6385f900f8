"""launch_tpu.sh: the gcloud commands its --dry-run prints, parsed back with shlex, and the scripts
it sends to the workers, executed here in a fake worker home against a stub Python."""

import os
import shlex
import shutil
import signal
import subprocess
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch_tpu.sh")
BASE = ["--project", "my-proj", "--zone", "us-central2-b", "--name", "rl-7b"]


@pytest.fixture(scope="module")
def no_gcloud_path(tmp_path_factory):
  """A PATH holding only what the dry run may use: bash and coreutils, no gcloud."""
  bin_dir = tmp_path_factory.mktemp("bin")
  for tool in ("bash", "basename", "dirname", "env"):
    os.symlink(shutil.which(tool), bin_dir / tool)
  return str(bin_dir)


def launch(args, env=None, path=None):
  clean = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
  clean.update(env or {})
  if path:
    clean["PATH"] = path
  return subprocess.run(["bash", SCRIPT] + args, capture_output=True, text=True, env=clean,
                        timeout=30)


def dry(args, env=None, path=None):
  proc = launch([args[0], "--dry-run"] + args[1:], env, path)
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def flags(argv):
  """--key=value words of a command -> dict (bare flags map to True)."""
  out = {}
  for word in argv:
    if word.startswith("--"):
      key, _, value = word[2:].partition("=")
      out[key] = value or True
  return out


def gcloud_tpu(cmds, verb):
  found = [c for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and c[4] == verb]
  assert found, f"no 'gcloud compute tpus tpu-vm {verb}' in {cmds}"
  for c in found:
    # scp names the TPU in its destination (SRC NAME:DEST); the others take it as first argument.
    assert c[6].startswith("rl-7b:") if verb == "scp" else c[5] == "rl-7b", c
    f = flags(c)
    assert f["zone"] == "us-central2-b" and f["project"] == "my-proj", c
  return found


def test_create_prints_describe_then_create(no_gcloud_path):
  cmds = dry(["create"] + BASE + ["--accelerator-type", "v4-32", "--spot"], path=no_gcloud_path)
  assert all(c[0] == "gcloud" for c in cmds)
  gcloud_tpu(cmds, "describe")  # the reuse check runs first
  (create,) = gcloud_tpu(cmds, "create")
  f = flags(create)
  assert f["accelerator-type"] == "v4-32" and f["version"] == "tpu-ubuntu2204-base"
  assert f["spot"] is True


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
  (create,) = gcloud_tpu([shlex.split(x) for x in proc.stdout.splitlines()], "create")
  assert flags(create)["accelerator-type"] == "v5p-64"


def test_setup_ships_the_checkout_and_data_and_installs_jax_tpu_on_every_worker(tmp_path):
  data = tmp_path / "data"
  (data / "math500").mkdir(parents=True)
  (data / "math500" / "test.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
  cmds = dry(["setup"] + BASE, env={"TMPDIR": str(tmp_path), "TPU_DATA": str(data)})
  code_tar, data_tar = (c for c in cmds if c[0] == "tar")
  code_scp, data_scp = gcloud_tpu(cmds, "scp")
  (ssh,) = gcloud_tpu(cmds, "ssh")
  code_tarball, data_tarball = (t[t.index("-czf") + 1] for t in (code_tar, data_tar))
  assert code_scp[5] == code_tarball and code_scp[6] == "rl-7b:explore_jax.tar.gz"
  assert data_scp[5] == data_tarball and data_scp[6] == "rl-7b:explore_jax_data.tar.gz"
  assert flags(code_scp)["worker"] == flags(data_scp)["worker"] == flags(ssh)["worker"] == "all"
  script = flags(ssh)["command"]
  # The locked versions of requirements/tpu.txt, then the package alone; the commit recorded.
  assert "pip install -q -r requirements/tpu.txt && $HOME/explore_jax_venv/bin/pip install -q " \
      "--no-deps -e ." in script
  assert "jax[tpu]" not in script
  commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
  assert f"echo {commit}" in script and "> $HOME/explore_jax/COMMIT" in script
  # The data lands in ~/shared/data: ../shared/data next to the code, where the package looks.
  assert "tar -xzf $HOME/explore_jax_data.tar.gz -C $HOME/shared/data" in script
  assert "tar -xzf $HOME/explore_jax.tar.gz -C $HOME/explore_jax" in script
  assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
  # The tarball commands really pack the package (without the venv and git data) and the data.
  for tar in (code_tar, data_tar):
    subprocess.run(tar, check=True, cwd=REPO, timeout=60)
  with tarfile.open(code_tarball) as tf:
    names = set(tf.getnames())
  assert {"./pyproject.toml", "./explore_jax/memory.py", "./launch_tpu.sh"} <= names
  assert not any(n.startswith(("./.venv", "./.git/")) or "__pycache__" in n for n in names)
  with tarfile.open(data_tarball) as tf:
    assert "./math500/test.jsonl" in tf.getnames()
  # Without a data directory: a warning, and only the code is shipped.
  proc = launch(["setup", "--dry-run"] + BASE, env={"TPU_DATA": str(tmp_path / "none")})
  assert proc.returncode == 0 and "no data directory" in proc.stderr
  assert sum(line.startswith("tar ") for line in proc.stdout.splitlines()) == 1


def test_setup_from_a_git_url_clones_instead_of_copying(tmp_path):
  cmds = dry(["setup"] + BASE + ["--repo", "https://example.com/me/explore_jax.git",
                                 "--ref", "v1.2", "--data", str(tmp_path)])
  # Only the data travels from here.
  tars = [c for c in cmds if c[0] == "tar"]
  assert len(tars) == 1 and tars[0][2].endswith("_data.tar.gz") and tars[0][4] == str(tmp_path)
  (ssh,) = gcloud_tpu(cmds, "ssh")
  script = flags(ssh)["command"]
  assert "git clone --quiet https://example.com/me/explore_jax.git" in script
  assert "checkout --quiet v1.2" in script


RUN_ARGS = BASE + ["--bucket", "gs://bkt/exp/",
                   "--config", "configs/ppo_qwen25_7b.py:variant=baseline",
                   "--env", "TPU_STDERR_LOG_LEVEL=2", "--", "--config.seed=3",
                   "--config.rl.note=it's quoted"]
TRAIN_ARGV = ["-m", "explore_jax.train", "--config", "configs/ppo_qwen25_7b.py:variant=baseline",
              "--workdir", "gs://bkt/exp/rl-7b/ppo_qwen25_7b-variant=baseline",
              "--config.distributed.coordinator=auto", "--config.seed=3",
              "--config.rl.note=it's quoted"]


def test_run_starts_the_trainer_on_all_workers():
  (ssh,) = gcloud_tpu(dry(["run"] + RUN_ARGS), "ssh")
  f = flags(ssh)
  assert f["worker"] == "all"
  assert "python -m explore_jax.train --config configs/ppo_qwen25_7b.py:variant=baseline" in (
      f["command"])
  assert "--workdir gs://bkt/exp/rl-7b/ppo_qwen25_7b-variant=baseline" in f["command"]
  explicit = flags(gcloud_tpu(dry(["run"] + BASE + ["--workdir", "gs://other/w"]), "ssh")[0])
  assert "--workdir gs://other/w" in explicit["command"]


def test_evaluate_starts_the_evaluator_on_all_workers_with_a_local_workdir():
  (ssh,) = gcloud_tpu(dry(["evaluate"] + BASE + ["--workdir", "/home/me/eval", "--",
                                                   "--config.model=/data/ckpt"]), "ssh")
  f = flags(ssh)
  assert f["worker"] == "all"
  argv = shlex.split(f["command"].split("nohup ")[1].split(" > ")[0])
  assert argv[1:] == ["-m", "explore_jax.evaluate", "--config", "configs/eval_paper.py",
                      "--workdir", "/home/me/eval", "--config.distributed.coordinator=auto",
                      "--config.model=/data/ckpt"]
  # The trainer's config and workdir variables do not leak into an evaluation.
  env = {"TPU_CONFIG": "configs/grpo_qwen25_7b.py", "TPU_WORKDIR": "gs://bkt/run"}
  command = flags(gcloud_tpu(dry(["evaluate"] + BASE + ["--workdir", "/e"], env=env),
                             "ssh")[0])["command"]
  assert "--config configs/eval_paper.py --workdir /e " in command
  assert "--workdir gs://bkt/run" in flags(gcloud_tpu(dry(["run"] + BASE, env=env),
                                                      "ssh")[0])["command"]
  # One job per TPU: the evaluation shares the trainer's pid file, so either refuses to start
  # while the other runs.
  run = flags(gcloud_tpu(dry(["run"] + RUN_ARGS), "ssh")[0])["command"]
  for command in (f["command"], run):
    assert "kill -0 \"$(cat $HOME/explore_jax_logs/job.pid)\"" in command


def _worker_script(args):
  return flags(gcloud_tpu(dry(args), "ssh")[0])["command"]


def test_worker_scripts_run_stop_and_tail_a_real_process(tmp_path):
  """Execute the run / logs / stop scripts in a fake worker home with a stub venv Python."""
  home = tmp_path
  (home / "explore_jax").mkdir()
  stub = home / "explore_jax_venv" / "bin" / "python"
  stub.parent.mkdir(parents=True)
  stub.write_text("#!/bin/bash\n"
                  "trap 'echo TERM > \"$HOME/got_term\"; exit 0' TERM\n"
                  "printf '%s\\0' \"$PWD\" \"$TPU_STDERR_LOG_LEVEL\" \"$@\" > \"$HOME/argv.tmp\"\n"
                  "mv \"$HOME/argv.tmp\" \"$HOME/argv\"\n"
                  "echo 'step 1 loss 0.5'\n"
                  "while true; do sleep 0.05; done\n")
  stub.chmod(0o755)
  env = dict(os.environ, HOME=str(home))
  sh = lambda script: subprocess.run(["bash", "-c", script], env=env, capture_output=True,
                                     text=True, timeout=30)
  started = sh(_worker_script(["run"] + RUN_ARGS))
  assert started.returncode == 0, started.stderr
  pid = int((home / "explore_jax_logs" / "job.pid").read_text())
  try:
    for _ in range(200):
      if (home / "argv").exists():
        break
      time.sleep(0.05)
    argv = (home / "argv").read_text().split("\0")[:-1]
    assert argv == [str(home / "explore_jax"), "2"] + TRAIN_ARGV
    again = sh(_worker_script(["run"] + RUN_ARGS))
    assert again.returncode == 1 and "already running" in again.stderr
    for _ in range(200):  # the stub writes argv before it logs its line
      logs = sh(_worker_script(["logs"] + BASE + ["--worker", "0"]))
      if "] step 1 loss 0.5" in logs.stdout:
        break
      time.sleep(0.05)
    assert "] step 1 loss 0.5" in logs.stdout and logs.stdout.startswith("[")
    stopped = sh(_worker_script(["stop"] + BASE))
    assert "sent SIGTERM" in stopped.stdout
    for _ in range(200):
      if (home / "got_term").exists():
        break
      time.sleep(0.05)
    assert (home / "got_term").read_text().strip() == "TERM"
  finally:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def test_logs_stop_delete_and_worker_selection():
  (logs,) = gcloud_tpu(dry(["logs"] + BASE + ["--worker", "3", "--follow"]), "ssh")
  assert flags(logs)["worker"] == "3" and "tail -n 200 -F" in flags(logs)["command"]
  (stop,) = gcloud_tpu(dry(["stop"] + BASE + ["--force"]), "ssh")
  assert flags(stop)["worker"] == "all" and "kill -KILL" in flags(stop)["command"]
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
    (["run"] + BASE, "missing --workdir"),
    (["run"] + BASE + ["--workdir", "/tmp/local"], "must be a gs:// path"),
    (["run"] + BASE + ["--bogus", "1"], "unknown argument '--bogus'"),
    (["evaluate"] + BASE, "evaluate: missing --workdir"),
    (["evaluate"] + BASE + ["--workdir", "gs://b/eval"], "not gs://"),
    (["evaluate"] + BASE + ["--workdir", "eval"], "give an absolute path"),
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
  assert "--accelerator-type" in proc.stdout
  assert launch([]).returncode != 0


def test_real_mode_without_gcloud_says_so(no_gcloud_path):
  proc = launch(["delete"] + BASE, path=no_gcloud_path)
  assert proc.returncode != 0 and "gcloud not found" in proc.stderr


def test_bash_syntax_and_shellcheck():
  assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not installed")
  proc = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout
