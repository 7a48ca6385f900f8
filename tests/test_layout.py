"""The package's shape: no import circle, few top-level modules, functions a reader can follow.

Imports are read from the source (every `import` and `from ... import`, also those inside
functions), not executed, so a circle that only a lazy import hides is found too.
"""

from __future__ import annotations

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "explore_jax")


def _modules() -> dict[str, str]:
  """Module name -> file, for every module of the package."""
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = path
  return out


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
  """The package's modules that `name` imports: `from a.b import c` names a.b.c when that is a
  module, else a.b; relative imports are resolved against the module's package."""
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name in modules)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      for a in node.names:
        if f"{base}.{a.name}" in modules:
          found.add(f"{base}.{a.name}")
        elif base in modules:
          found.add(base)
  found.discard(name)
  return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_cycle_finder_finds_a_circle():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_package():
  modules = _modules()
  graph = {name: _imports(name, path, modules) for name, path in modules.items()}
  # The graph is real: the trainer's loop imports the rollout, the step and the data.
  assert {"explore_jax.train.step", "explore_jax.data"} <= graph["explore_jax.train.loop"]
  assert "explore_jax.rollout.engine" in graph["explore_jax.rollout"]
  assert _cycles(graph) == []


def test_at_most_ten_modules_at_the_top_level():
  top = sorted(n for n in os.listdir(PACKAGE) if n.endswith(".py") and n != "__init__.py")
  assert len(top) <= 10, top


def test_no_function_over_100_lines():
  long = []
  for name, path in _modules().items():
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > 100:
          long.append(f"{name}.{node.name}: {lines} lines")
  assert not long, long
