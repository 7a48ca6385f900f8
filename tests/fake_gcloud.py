"""A stand-in for `gcloud compute tpus` in the launcher tests: it records every call and plays a
TPU whose workers are directories on this machine.

World state lives in $FAKE_GCLOUD/world.json:
  node      {"state": "READY", "type": "v4-8"} or null (no TPU VM)
  qr        {"state": "...", "type": ..., "version": ...} or null (no queued resource)
  workers   how many workers (homes $FAKE_GCLOUD/w0, w1, ...)
  script    node states that `describe` answers before the current one, in order; an entry
            {"state": S, "when": [FILE...]} waits until these files exist in $FAKE_GCLOUD; PREEMPTED and
            TERMINATED kill the workers' processes, as a preemption does
  qr_script the same for the queued resource's states (ACTIVE brings up its TPU VM)

`tpu-vm ssh --command=C` runs `bash -c C` in each selected worker's home, with $FAKE_GCLOUD/stubs
first on PATH; `scp` copies into the homes; `create` gives fresh homes, `delete` removes them.
Every call is appended to $FAKE_GCLOUD/calls.jsonl as {"argv": [...], "what": "..."}.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

ROOT = os.environ["FAKE_GCLOUD"]
WORLD = os.path.join(ROOT, "world.json")


def load():
  with open(WORLD) as f:
    return json.load(f)


def save(world):
  with open(WORLD + ".tmp", "w") as f:
    json.dump(world, f)
  os.replace(WORLD + ".tmp", WORLD)


def flag(argv, key):
  for word in argv:
    if word.startswith(f"--{key}="):
      return word.split("=", 1)[1]
    if word == f"--{key}":
      return True
  return None


def home(i):
  return os.path.join(ROOT, f"w{i}")


def kill_workers(world):
  """A preempted or deleted VM: every job process on it dies."""
  for i in range(world["workers"]):
    pgid = os.path.join(home(i), "explore_jax_logs", "job.pgid")
    if os.path.exists(pgid):
      try:
        os.killpg(int(open(pgid).read()), signal.SIGKILL)
      except (ProcessLookupError, ValueError):
        pass


def fresh_homes(world):
  for i in range(world["workers"]):
    shutil.rmtree(home(i), ignore_errors=True)
    os.makedirs(home(i))
    open(os.path.join(home(i), "dev-accel0"), "w").close()


def next_state(world, key, script_key):
  script = world.get(script_key) or []
  if script:
    entry = script[0]
    if isinstance(entry, str):
      entry = {"state": entry}
    if all(os.path.exists(os.path.join(ROOT, f)) for f in entry.get("when", [])):
      script.pop(0)
      world[key]["state"] = entry["state"]
      if key == "node" and entry["state"] in ("PREEMPTED", "TERMINATED"):
        kill_workers(world)
  return world[key]["state"]


def not_found(kind):
  print(f"ERROR: (gcloud.compute.tpus.{kind}.describe) NOT_FOUND: Resource "
        f"'projects/p/locations/z/nodes/n' was not found", file=sys.stderr)
  return 1


def tpu_vm(verb, argv, world):
  if verb == "describe":
    if world["node"] is None:
      return not_found("tpu-vm")
    state = next_state(world, "node", "script")
    fmt = flag(argv, "format")
    print(f"{state}\t{world['node']['type']}" if fmt else
          f"state: {state}\nacceleratorType: {world['node']['type']}")
    return 0
  if verb == "create":
    if world["node"] is not None:
      print("ERROR: already exists", file=sys.stderr)
      return 1
    world["node"] = {"state": "READY", "type": flag(argv, "accelerator-type")}
    fresh_homes(world)
    return 0
  if verb == "delete":
    kill_workers(world)
    world["node"] = None
    for i in range(world["workers"]):
      shutil.rmtree(home(i), ignore_errors=True)
    return 0
  if verb == "start":
    world["node"]["state"] = "READY"
    return 0
  if world["node"] is None or world["node"]["state"] != "READY":
    print("ERROR: (gcloud.compute.tpus.tpu-vm.ssh) the TPU is not READY", file=sys.stderr)
    return 255
  which = flag(argv, "worker") or "0"
  workers = range(world["workers"]) if which == "all" else [int(w) for w in which.split(",")]
  if verb == "scp":
    src, dest = [a for a in argv[1:] if not a.startswith("--")][:2]
    for i in workers:
      shutil.copy(src, os.path.join(home(i), dest.split(":", 1)[1]))
    return 0
  if verb == "ssh":
    command = flag(argv, "command")
    rc = 0
    for i in workers:
      env = dict(os.environ, HOME=home(i), FAKE_WORKER=str(i), FAKE_WORKERS=str(world["workers"]),
                 PATH=os.path.join(ROOT, "stubs") + ":" + os.environ["PATH"],
                 EXPLORE_JAX_TPU_DEVICES=os.path.join(home(i), "dev-accel*"),
                 EXPLORE_JAX_LIBTPU_LOCKFILE=os.path.join(home(i), "libtpu_lockfile"))
      rc = max(rc, subprocess.run(["bash", "-c", command], cwd=home(i), env=env).returncode)
    return rc
  raise SystemExit(f"fake gcloud: tpu-vm {verb} not played")


def queued(verb, argv, world):
  if verb == "describe":
    if world["qr"] is None:
      return not_found("queued-resources")
    state = next_state(world, "qr", "qr_script")
    if state == "ACTIVE" and world["node"] is None:
      world["node"] = {"state": "READY", "type": world["qr"]["type"]}
      fresh_homes(world)
    print(state)
    return 0
  if verb == "create":
    world["qr"] = {"state": "WAITING_FOR_RESOURCES", "type": flag(argv, "accelerator-type")}
    return 0
  if verb == "delete":
    if world["node"] is not None and not flag(argv, "force"):
      print("ERROR: the queued resource still has nodes (use --force)", file=sys.stderr)
      return 1
    kill_workers(world)
    world["qr"] = world["node"] = None
    return 0
  raise SystemExit(f"fake gcloud: queued-resources {verb} not played")


def describe_call(argv):
  what = " ".join(argv[2:4])
  command = flag(argv, "command")
  if isinstance(command, str) and "' ej " in command:
    what += ":" + command.rsplit("' ej ", 1)[1].split()[0]
  return what


def main(argv):
  assert argv[:2] == ["compute", "tpus"], argv
  with open(os.path.join(ROOT, "calls.jsonl"), "a") as f:
    f.write(json.dumps({"argv": argv, "what": describe_call(argv)}) + "\n")
  world = load()
  group, verb, rest = argv[2], argv[3], argv[3:]
  try:
    return tpu_vm(verb, rest, world) if group == "tpu-vm" else queued(verb, rest, world)
  finally:
    save(world)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
