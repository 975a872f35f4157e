"""The shape of the package: no import cycles among paf_ray's modules."""

from __future__ import annotations

import ast
import os
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
