"""The layering rule, read from the source with `ast`: project imports flow one way,
configs -> model -> train -> rl -> eval, with no cycle; only the entry points over every stage,
train/pipeline.py (runs them) and train/aot.py (compiles them), may import from every layer;
configs import only configs; at most MAX_FUNCTION_IMPORTS project imports sit inside functions."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ("configs", "model", "train", "rl", "eval")
ORCHESTRATORS = ("train.pipeline", "train.aot")  # entry points over every objective
MAX_FUNCTION_IMPORTS = 5


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _imported(node, modules: set) -> list:
  """Project modules an Import / ImportFrom node names (`from train import loop` -> train.loop)."""
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  elif node.level == 0 and node.module:
    names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
             for a in node.names]
  else:
    names = []
  return [n for n in names if n.split(".")[0] in LAYERS]


def project_imports() -> list:
  """[(importer, imported, inside a function)] of every .py under the five packages."""
  paths = [p for layer in LAYERS for p in glob.glob(os.path.join(ROOT, layer, "**", "*.py"), recursive=True)]
  modules = {_module_name(p) for p in paths}
  edges = []
  for path in paths:
    tree = ast.parse(open(path).read(), path)
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        edges += [(_module_name(path), target, id(node) in inside) for target in _imported(node, modules)]
  return edges


def _layer(module: str) -> int:
  return LAYERS.index(module.split(".")[0])


def find_cycle(edges) -> list:
  """One import cycle as [a, b, ..., a], or [] if there is none."""
  graph = {}
  for a, b, _ in edges:
    if a != b:
      graph.setdefault(a, set()).add(b)
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return []

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return []


def test_the_scan_sees_the_project():
  edges = project_imports()
  assert ("train.loop", "train.objectives", False) in edges
  assert len({a for a, _, _ in edges}) > 40


def test_no_import_cycle():
  assert find_cycle(project_imports()) == []


def test_find_cycle_finds_one():
  assert find_cycle([("a", "b", False), ("b", "c", True), ("c", "a", False)]) == ["a", "b", "c", "a"]


def test_no_upward_import_except_the_orchestrator():
  upward = sorted({f"{a} -> {b}" for a, b, _ in project_imports()
                   if _layer(b) > _layer(a) and a not in ORCHESTRATORS})
  assert upward == [], f"imports from a higher layer (order {' -> '.join(LAYERS)}): {upward}"


def test_configs_import_only_configs():
  bad = sorted({f"{a} -> {b}" for a, b, _ in project_imports()
                if a.startswith("configs") and not b.startswith("configs")})
  assert bad == []


def test_few_function_level_imports():
  inside = sorted({f"{a} -> {b}" for a, b, fn in project_imports() if fn})
  assert len(inside) <= MAX_FUNCTION_IMPORTS, f"project imports inside functions: {inside}"
