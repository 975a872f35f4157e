"""The shape of the package: no import cycles, floors that import only downwards, imports at the top
of files, and no task named outside the tasks and the BDD100K facts."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import paf_ray

ROOT = Path(paf_ray.__file__).parent


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module of the package at `root` -> the package's modules it imports, at module level or
    inside functions, relative imports resolved.

    `from pkg import name` counts as importing pkg.name when that is a module, else pkg.
    Importing a submodule runs its package's __init__ too, but that edge is Python's, not the
    code's choice, so only the named module counts.
    """
    top = root.name
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in files else mod for a in node.names]
            else:
                continue
            for target in targets:
                # `import paf_ray.a.b` names the module paf_ray.a.b (or, for an attribute path, the longest module prefix)
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if (target == top or target.startswith(top + ".")) and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("from .. import c\n")
    (pkg / "c.py").write_text("import os\n\n\ndef g():\n    import pkg.a\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(pkg)) is None


def test_paf_ray_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_gpu_bench_modules_import_neither_ray_open_clip_nor_pycocotools():
    """scripts/gpu_bench.sh runs these on a GPU machine's stock image, where none of the three is installed
    (tests/test_bench.py runs the bench's gpu and step cases where they cannot be imported)."""
    import subprocess
    import sys

    code = ("import sys, paf_ray.bench, paf_ray.bench.run, paf_ray.bench.step_case, paf_ray.bench.report, "
            "paf_ray.bench.step_time, paf_ray.train.step, box_check\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'open_clip', 'pycocotools'}))")
    tests = os.path.dirname(os.path.abspath(__file__))  # box_check.py: the box check gpu_bench.sh runs
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT.parent), tests])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


# --------------------------------------------------------------------------- floors

# Bottom up: a module imports only modules on its own floor or below. `commands` are the
# command handlers of every area (`<area>/commands.py` and paf_ray/commands.py) with cli.py on top.
FLOORS = [
    {"registry", "runtime", "viz"},  # nothing of paf_ray's: Ray start, storage, run folders, drawing
    {"data"},  # the dataset: BDD100K facts, index, decode, transforms, Ray Data pipeline
    {"tasks"},  # one module per task: labels to metrics
    {"models", "eval"},  # backbones, adapters, the assembled model; the evaluator over the tasks
    {"config", "cluster"},  # the schema knows the plug-ins' sections; does a job fit a cluster
    {"train"},  # the loop, the stage runner, checkpoints
    {"tune", "predict", "jobs", "bench"},
    {"export", "study"},
    {"commands", "cli", "__main__", "paf_ray"},
]


def area(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "paf_ray"
    return "commands" if parts[-1] == "commands" else parts[1]


def floor(module: str) -> int:
    a = area(module)
    for i, names in enumerate(FLOORS):
        if a in names:
            return i
    raise AssertionError(f"{module}: area {a!r} is on no floor of tests/test_architecture.py FLOORS")


def test_every_import_goes_down_the_floors():
    graph = import_graph()
    upward = sorted(f"{m} (floor {floor(m)}) imports {d} (floor {floor(d)})"
                    for m, deps in graph.items() for d in deps if floor(d) > floor(m))
    assert not upward, "imports that go up a floor:\n" + "\n".join(upward)


def test_the_floor_checker_sees_an_upward_import():
    assert floor("paf_ray.data.pipeline") < floor("paf_ray.train.loop")
    assert floor("paf_ray.runtime.storage") == 0 and floor("paf_ray.data.commands") == len(FLOORS) - 1


# Imports of paf_ray modules inside functions, where the top of the file is not the place: the
# command handlers (so `paf-ray --help` loads neither torch nor Ray), `paf_ray.load` (so `import
# paf_ray` stays light), and a task's torch side (Ray Data's decode workers import the task
# modules and must not pay for torch). Anything else goes at the top of its file.
LAZY_ALLOWED = {
    ("paf_ray", "paf_ray.predict"),
    ("paf_ray.predict", "paf_ray.runtime.ray"),  # Ray, only for --distributed
    ("paf_ray.cluster", "paf_ray.runtime.ray"),  # Ray, only when a driver joins a cluster
    ("paf_ray.cluster", "paf_ray.data.pipeline"),  # Ray Data, only for a job's CPU plan
    ("paf_ray.tasks.det", "paf_ray.tasks.det.heads"),
    ("paf_ray.tasks.masks", "paf_ray.tasks.seg_head"),
    ("paf_ray.tasks.lane", "paf_ray.tasks.seg_head"),
}


def function_level_imports(root: Path = ROOT) -> set[tuple[str, str]]:
    out = set()
    for path in root.rglob("*.py"):
        name = _module_name(path, root)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and id(node) not in top and not node.level:
                if (node.module or "").startswith("paf_ray"):
                    out.add((name, node.module))
            elif isinstance(node, ast.Import) and id(node) not in top:
                out.update((name, a.name) for a in node.names if a.name.startswith("paf_ray"))
    return out


def test_imports_of_paf_ray_modules_are_at_the_top_of_files():
    lazy = {(m, d) for m, d in function_level_imports() if area(m) not in ("commands", "bench")}
    unexpected = sorted(lazy - LAZY_ALLOWED)
    assert not unexpected, "imports inside functions (move them to the top of the file):\n" + "\n".join(
        f"{m}: {d}" for m, d in unexpected)


# --------------------------------------------------------------------------- tasks are plug-ins


def named_tasks(path: Path, tasks: set[str]) -> list[str]:
    """Where code names a task: a string literal with a task key as a word ("det/AP", "has_sem",
    "model.heads.det"), or an identifier with one as a word (det_head, has_sem, SEM_CLASSES).
    Docstrings and comments are prose, not code."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    found = []

    def word_hit(name: str) -> bool:
        return any(part.lower() in tasks for part in name.split("_"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if any(word in tasks for word in re.split(r"[^A-Za-z0-9]+", node.value)):
                found.append(f"{path}:{node.lineno}: the string {node.value[:60]!r}")
        elif isinstance(node, ast.Name) and word_hit(node.id):
            found.append(f"{path}:{node.lineno}: the name {node.id}")
        elif isinstance(node, ast.Attribute) and word_hit(node.attr):
            found.append(f"{path}:{node.lineno}: the attribute .{node.attr}")
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and word_hit(node.name):
            found.append(f"{path}:{node.lineno}: the definition {node.name}")
        elif isinstance(node, ast.alias) and word_hit((node.asname or node.name).split(".")[-1]):
            found.append(f"{path}:{node.lineno}: the import {node.name}")
    return found


def test_no_product_code_outside_the_tasks_and_the_bdd100k_facts_names_a_task():
    from paf_ray.tasks import TASKS

    tasks = set(TASKS.names())
    exempt = (ROOT / "tasks", ROOT / "data" / "bdd100k")
    hits = []
    for path in sorted(ROOT.rglob("*.py")):
        if not any(path.is_relative_to(e) for e in exempt):
            hits += named_tasks(path, tasks)
    assert not hits, "task names outside paf_ray/tasks and paf_ray/data/bdd100k:\n" + "\n".join(hits)


def test_the_task_name_finder_finds_names_in_code_not_in_prose(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('"""The det head and sem masks, in prose."""\n'
                   'KEYS = ("det/AP", "score")  # a det comment\n'
                   'def f(batch):\n    """Only sem here."""\n    return batch["has_sem"], has_det, x.det_head\n'
                   'detail = "detail"\n')
    found = " | ".join(named_tasks(src, {"det", "sem"}))
    assert found.count("m.py:") == 4, found
    assert all(hit in found for hit in ("'det/AP'", "'has_sem'", "the name has_det", "the attribute .det_head"))
