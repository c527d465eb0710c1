"""The rooms form layers (issue 20): the project's modules import one another without a cycle, and
no module imports a command. Read from the source with ast, so an import inside a function counts
as much as one at the top."""
import ast
import os

from conftest import ROOT

COMMANDS = {"train", "evaluate", "explain", "compare", "export"}  # top-level scripts a user runs, and every benchmark


def project_modules():
    """{module name: path} of the top-level modules and the benchmarks."""
    found = {}
    for folder in (ROOT, os.path.join(ROOT, "benchmarks")):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                found[name[:-3]] = os.path.join(folder, name)
    return found


def imports(path, names):
    """The project modules that the file at ``path`` imports (anywhere in it)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out & names


def graph():
    modules = project_modules()
    return {m: imports(p, set(modules)) - {m} for m, p in modules.items()}


def find_cycle(edges):
    """One import cycle as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_modules_import_each_other_without_a_cycle():
    edges = graph()
    assert {"models", "checkpoints", "torchfile", "train"} <= edges.keys()
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))
    # the two rooms that used to import each other: the checkpoint format sits above the models
    assert "checkpoints" not in edges["models"] and "models" in edges["checkpoints"]
    assert edges["torchfile"] <= {"utils"}  # the low room: safe reading of untrusted torch files


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_module_imports_a_command():
    commands = COMMANDS | {name for name, path in project_modules().items() if "benchmarks" in path}
    assert {"bench", "reproduce", "gpu_check", "cpu_speed"} <= commands
    importers = {m: sorted(deps & commands) for m, deps in graph().items() if deps & commands}
    assert importers == {}
