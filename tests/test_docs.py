"""The README and the docs pages point at things that exist.

A user copies commands from README.md and docs/*.md: a `python -m` module, a `make` target, a
file path or a link that a move left behind fails only when someone tries it. These checks read
the Markdown and the tree; nothing is imported or run (modules are found with importlib's path
finder, whose lookups execute no package code).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 250


def _pages() -> list[pathlib.Path]:
  """Every user-facing Markdown page: the README, docs/*.md and the benchmarks' how-to."""
  pages = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
  return [p for p in pages if p.exists()]


def _fenced_blocks(text: str) -> list[str]:
  return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)


def _prose(text: str) -> str:
  """The text outside fenced code blocks (links inside code are not links)."""
  return re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


def _anchors(page: pathlib.Path) -> set[str]:
  headings = re.findall(r"^#{1,6} +(.+?) *$", _prose(page.read_text()), flags=re.M)
  return {_slug(h) for h in headings}


def _relative_links(page: pathlib.Path) -> list[str]:
  targets = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", _prose(page.read_text()))
  return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # no http:, mailto:


def test_slug_follows_github():
  assert _slug("What `make demo` prints") == "what-make-demo-prints"
  assert _slug("train_step.py") == "train_steppy"
  assert _slug("On a TPU pod") == "on-a-tpu-pod"


def test_readme_is_short():
  lines = README.read_text().splitlines()
  assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines"


def test_readme_opens_with_the_two_commands():
  text = README.read_text()
  first = _fenced_blocks(text)[0]
  commands = [line.split("#")[0].strip() for line in first.splitlines()]
  assert "make demo" in commands and "make test" in commands, first
  # At the very top: before the first section.
  assert text.index("```") < text.index("\n## "), "the commands come after a section heading"


def test_relative_links_point_to_existing_files_and_headings():
  checked, broken = 0, []
  for page in _pages():
    for target in _relative_links(page):
      path, _, anchor = target.partition("#")
      dest = (page.parent / path).resolve() if path else page
      checked += 1
      if not dest.exists():
        broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
      elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
        broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
  assert not broken, "\n".join(broken)
  assert checked >= 20, f"only {checked} relative links found: is the link pattern right?"


def _module_spec(name: str):
  """The spec of module `name`, found through the parent packages' paths without importing them
  (importlib.util.find_spec would run every parent's __init__)."""
  parts = name.split(".")
  spec = importlib.util.find_spec(parts[0])  # a top-level lookup executes nothing
  for i in range(1, len(parts)):
    if spec is None or spec.submodule_search_locations is None:
      return None
    spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:i + 1]),
                                                     spec.submodule_search_locations)
  return spec


def _runnable(name: str) -> bool:
  """Whether `python -m name` finds something to run: a module, or a package with __main__."""
  spec = _module_spec(name)
  if spec is None:
    return False
  if spec.submodule_search_locations is not None:
    return importlib.machinery.PathFinder.find_spec(
        name + ".__main__", spec.submodule_search_locations) is not None
  return True


def test_module_lookup_tells_runnable_from_not():
  assert _runnable("explore_jax.train")  # a package with __main__.py
  assert _runnable("explore_jax.tpu.memory")  # a module
  assert not _runnable("explore_jax.rl")  # a package without __main__.py
  assert not _runnable("explore_jax.sampling")  # no such module


def test_python_m_modules_exist():
  named = set()
  for page in _pages():
    named |= set(re.findall(r"python -m (explore_jax(?:\.\w+)*)", page.read_text()))
  missing = sorted(m for m in named if not _runnable(m))
  assert not missing, f"`python -m` modules named in the docs that do not exist: {missing}"
  expected = {"explore_jax.train", "explore_jax.evaluate", "explore_jax.generate",
              "explore_jax.convert", "explore_jax.aot", "explore_jax.analyze", "explore_jax.plots",
              "explore_jax.demo", "explore_jax.demo.repro", "explore_jax.tpu.memory"}
  assert expected <= named, f"not found in the docs: {sorted(expected - named)}"


def _defines(name: str) -> bool:
  """Whether dotted `name` is a module, or a module and a name its source defines or imports."""
  parts = name.split(".")
  for i in range(len(parts), 0, -1):
    spec = _module_spec(".".join(parts[:i]))
    if spec is not None:
      break
  else:
    return False
  rest = parts[i:]
  if not rest:
    return True
  if spec.origin is None or len(rest) > 2:  # module.name or module.Class.method, no deeper
    return False
  source = pathlib.Path(spec.origin).read_text()
  attr = re.escape(rest[0])
  return re.search(rf"^(?:def|class) {attr}\b|^{attr}\s*[:=]|^from \S+ import .*\b{attr}\b",
                   source, flags=re.M) is not None


def test_dotted_name_lookup_tells_defined_from_not():
  assert _defines("explore_jax.rollout.generate")  # defined in a package's __init__
  assert _defines("explore_jax.evaluation.pass_at_k")  # imported into a package's __init__
  assert not _defines("explore_jax.sampling.generate")  # a module that moved
  assert not _defines("explore_jax.rl.advantages.no_such_function")


def test_dotted_names_exist():
  named = set()
  for page in _pages():
    named |= set(re.findall(r"`(explore_jax(?:\.\w+)+)", page.read_text()))
  missing = sorted(n for n in named if not _defines(n))
  assert not missing, f"names in the docs that the package does not define: {missing}"
  assert {"explore_jax.rollout.generate", "explore_jax.evaluation.pass_at_k"} <= named


def test_make_targets_exist():
  makefile = (ROOT / "Makefile").read_text()
  targets = set(re.findall(r"^([\w.-]+):", makefile, flags=re.M))
  named = set()
  for page in _pages():
    named |= set(re.findall(r"(?:^|`)make ([a-z][\w-]*)", page.read_text(), flags=re.M))
  assert {"demo", "test"} <= named
  assert not named - targets, f"make targets named in the docs but not in the Makefile: " \
                              f"{sorted(named - targets)}"


def test_repository_paths_exist():
  pattern = r"\b((?:configs|benchmarks|explore_jax|docs|tests|requirements)/[\w./-]*\w)"
  checked, missing = 0, []
  for page in _pages():
    for path in set(re.findall(pattern, page.read_text())):
      checked += 1
      if not (ROOT / path).exists():
        missing.append(f"{page.relative_to(ROOT)}: {path}")
  assert not missing, "\n".join(sorted(missing))
  assert checked >= 30, f"only {checked} paths found: is the path pattern right?"
