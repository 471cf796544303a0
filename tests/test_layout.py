"""House rules of the tree, checked from the source: no import cycle, moe_jax never
imports calm_jax, no module over 600 lines and no function over 80.

The import graph is built with ``ast`` from every ``import`` / ``from ... import``
statement (at module level or inside functions: a lazy import is still a
dependency), so a new cycle fails here before it bites at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("moe_jax", "calm_jax")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
  mods = {}
  for pkg in PACKAGES:
    for path in (ROOT / pkg).rglob("*.py"):
      parts = list(path.relative_to(ROOT).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts.pop()
      mods[".".join(parts)] = path
  return mods


def _imported(name: str, path: Path, node: ast.AST) -> list[str]:
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names]
  if isinstance(node, ast.ImportFrom):
    if node.level:  # relative: resolve against this module's package
      package = name.split(".")
      if path.name != "__init__.py":
        package.pop()
      package = package[:len(package) - node.level + 1]
      base = ".".join(package + ([node.module] if node.module else []))
    else:
      base = node.module
    return [base] + [f"{base}.{alias.name}" for alias in node.names]
  return []


def import_graph() -> dict[str, set[str]]:
  """Module -> the project modules it imports (the deepest existing module of each name)."""
  mods = _modules()
  graph = {name: set() for name in mods}
  for name, path in mods.items():
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
      for target in _imported(name, path, node):
        while target and target not in mods:
          target = target.rpartition(".")[0]
        if target and target != name:
          graph[name].add(target)
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan, iterative)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []
  for root in graph:
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = len(index)
    stack.append(root)
    on_stack.add(root)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = len(index)
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph[child]))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == node:
            break
        if len(component) > 1:
          found.append(sorted(component))
  return found


def test_cycle_finder_finds_a_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert cycles(graph) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
  found = cycles(import_graph())
  assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_moe_jax_never_imports_calm_jax():
  bad = {name: sorted(t for t in targets if t.split(".")[0] == "calm_jax")
         for name, targets in import_graph().items() if name.split(".")[0] == "moe_jax"}
  bad = {name: targets for name, targets in bad.items() if targets}
  assert not bad, f"moe_jax modules importing calm_jax: {bad}"


def test_module_and_function_sizes():
  too_big = []
  for path in _modules().values():
    source = path.read_text()
    rel = path.relative_to(ROOT)
    if len(source.splitlines()) > MAX_MODULE_LINES:
      too_big.append(f"{rel}: {len(source.splitlines())} lines")
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES:
          too_big.append(f"{rel}:{node.lineno} {node.name}: {length} lines")
  assert not too_big, "split these:\n" + "\n".join(too_big)
