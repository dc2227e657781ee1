"""The package's shape: imports flow one way (no cycle, function-level imports included), no
module over 400 lines, and the config files import no jax."""

import ast
import os
import subprocess
import sys

from helpers import REPO

PACKAGE = os.path.join(REPO, "divisive_jax")
MAX_LINES = 400


def _modules() -> dict[str, str]:
  """Dotted module name -> file, for every module of the package."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


def _targets(node, modules) -> set[str]:
  """The package modules an import statement loads (parent packages included)."""
  names = []
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
  out = set()
  for name in names:
    parts = name.split(".")
    for i in range(2, len(parts) + 1):  # importing a.b.c runs a.b's __init__ too
      candidate = ".".join(parts[:i])
      if candidate in modules:
        out.add(candidate)
  return out


def import_graph() -> dict[str, set[str]]:
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read())
    deps = set()
    for node in ast.walk(tree):  # module level AND inside functions
      deps |= _targets(node, modules)
    parent = name.rsplit(".", 1)[0]
    graph[name] = {d for d in deps if d != name and not (name.startswith(d + ".") and d == parent)}
  return graph


def _find_cycle(graph):
  state, stack = {}, []

  def visit(n):
    state[n] = "open"
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      if state.get(m) == "open":
        return stack[stack.index(m) :] + [m]
      if m not in state:
        cycle = visit(m)
        if cycle:
          return cycle
    stack.pop()
    state[n] = "done"
    return None

  for n in sorted(graph):
    if n not in state:
      cycle = visit(n)
      if cycle:
        return cycle
  return None


def test_the_import_graph_is_acyclic():
  graph = import_graph()
  assert "divisive_jax.train" in graph and graph["divisive_jax.train"]  # the walk sees imports
  cycle = _find_cycle(graph)
  assert cycle is None, " -> ".join(cycle)


def test_the_graph_detects_a_cycle():
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_job_is_at_the_top():
  """Nothing below the job imports it: train, main and the CLIs are imported by no library
  module (sweep runs jobs, so it may import train)."""
  graph = import_graph()
  entry = {
    "divisive_jax.train",
    "divisive_jax.main",
    "divisive_jax.evaluate",
    "divisive_jax.explain",
    "divisive_jax.report",
    "divisive_jax.sweep",
  }
  for name, deps in graph.items():
    if name in entry:
      continue
    assert not deps & {"divisive_jax.train", "divisive_jax.main"}, name


def test_no_module_over_400_lines():
  long = {}
  for name, path in _modules().items():
    with open(path) as f:
      n = sum(1 for _ in f)
    if n > MAX_LINES:
      long[name] = n
  assert not long, long


def test_configs_import_no_jax():
  code = (
    "import sys, importlib.util\n"
    "for name in ('iris_pad', 'chest_xray', 'synthetic_faces', 'shortcut'):\n"
    "  spec = importlib.util.spec_from_file_location(name, f'configs/{name}.py')\n"
    "  m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
    "  m.get_config('quick,cyborg')\n"
    "print(sorted(k for k in sys.modules if k == 'jax' or k.startswith(('jax.', 'flax'))))\n"
  )
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == "[]"
