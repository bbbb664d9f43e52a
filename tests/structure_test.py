"""The package's structure as rules that can fail: no import cycle among its modules (lazy
imports inside functions included: they are how a cycle hides), and one module that reads the
platform."""

import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'mla_jax'


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """The package modules a file imports, anywhere in it ('from mla_jax import x' counts as
  mla_jax.x where x is a module)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f'{node.module}.{a.name}' for a in node.names] + [node.module]
    else:
      continue
    found |= {n for n in names if n in modules}
  return found


def import_graph() -> dict[str, set[str]]:
  files = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
  modules = set(files)
  # A package's __init__ is imported by its submodules' imports: it is not an edge of theirs.
  return {name: _imports(path, modules) - {name} - {
      m for m in modules if name.startswith(m + '.')} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 'open':
        return [*stack[stack.index(nxt):], nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    state[node] = 'done'
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_no_import_cycle_among_the_package_modules():
  graph = import_graph()
  assert len(graph) > 20 and 'mla_jax.attention_op' in graph['mla_jax.attention']
  assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_the_config_imports_nothing_of_the_model():
  graph = import_graph()
  reached, todo = set(), ['mla_jax.config']
  while todo:
    for nxt in graph[todo.pop()] - reached:
      reached.add(nxt)
      todo.append(nxt)
  assert not reached & {'mla_jax.attention', 'mla_jax.model', 'mla_jax.attention_op',
                        'mla_jax.cache', 'mla_jax.kernels.cpu_attention'}, reached


# Asking jax which platform runs: its default backend, or a device's platform.
PLATFORM_READS = re.compile(r'default_backend\(|devices(\.flat\[0\]|\(\)\[0\])\.platform|'
                            r'device\.platform')


def test_only_the_platform_module_reads_the_platform():
  readers = sorted(str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob('*.py')
                   if PLATFORM_READS.search(p.read_text()))
  assert readers == ['mla_jax/platform.py'], readers
