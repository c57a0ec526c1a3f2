"""The layers hold: imports go one way, and no module reaches into another's private names.

Every .py file of the package (tests/ and benchmarks/ aside) is parsed, never imported; module-level
and function-level imports (and `if TYPE_CHECKING:` ones) all count. The layers, bottom to top:

    core         chipcheck, results, failures, generator   (the result types, the deterministic inputs)
    model        model/                                (the reference training stack)
    probes       probes/                               (what runs on a chip)
    reports      reports/                              (pure: results in, documents out)
    reproducers  reproducers/                          (capture, replay, shrink, emit, bundle)
    fleet        fleet/                                (devices, workers, launchers, store, judges)
    app          cli, options, torchrun, worker, pytest_plugin   (command lines and entry points)

A new upward edge fails here. An edge known to go the wrong way that cannot be fixed yet is listed
in ALLOWED_EXCEPTIONS with why; fix it, then drop it from the list.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "chipcheck"
EXCLUDED_DIRS = {"tests", "benchmarks"}

APP_MODULES = {"chipcheck.cli", "chipcheck.options", "chipcheck.torchrun", "chipcheck.worker",
               "chipcheck.pytest_plugin"}
CORE_MODULES = {"chipcheck", "chipcheck.results", "chipcheck.failures", "chipcheck.generator"}

MAY_IMPORT: dict[str, set[str]] = {
    "core": {"core"},
    "model": {"core", "model"},
    "probes": {"core", "model", "probes"},
    "reports": {"core", "reports"},
    "reproducers": {"core", "model", "probes", "reproducers"},
    "fleet": {"core", "model", "probes", "fleet"},
    "app": {"core", "model", "probes", "reports", "reproducers", "fleet", "app"},
}
"""Which layers each layer may import. reports/ imports only the result types (STYLE.md); fleet/
does not render documents (the command line does) and reproducers/ and fleet/ do not know each other."""

NOBODY_IMPORTS = {"chipcheck.cli"}
"""The top: `chipcheck` itself (the cli/ package: one module per command group); the torchrun entry point
builds on chipcheck.options instead."""

ALLOWED_EXCEPTIONS: dict[tuple[str, str], str] = {}
"""(importer, imported) -> why this upward edge is still here. Empty: every layer holds."""


@dataclass(frozen=True, slots=True)
class Edge:
    importer: str
    imported: str
    line: int


@dataclass(frozen=True, slots=True)
class PrivateUse:
    importer: str
    owner: str
    name: str
    line: int


def module_name(path: Path, root: Path = ROOT) -> str:
    """chipcheck.fleet.worker for ROOT/fleet/worker.py; chipcheck.probes for ROOT/probes/__init__.py."""
    parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_sources(root: Path = ROOT) -> dict[str, tuple[str, bool]]:
    """module name -> (source, is a package __init__) for every .py file of the package."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if rel[0] in EXCLUDED_DIRS or any(x.startswith(".") or x.endswith(".egg-info") for x in rel):
            continue
        out[module_name(p, root)] = (p.read_text(), p.name == "__init__.py")
    return out


def _base(module: str, node: ast.ImportFrom, is_pkg: bool) -> str | None:
    """The absolute module a `from ... import` names."""
    if node.level == 0:
        return node.module
    parts = module.split(".") if is_pkg else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _ours(name: str | None) -> bool:
    return name is not None and (name == PACKAGE or name.startswith(PACKAGE + "."))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def scan(module: str, source: str, is_pkg: bool, modules: set[str]) -> tuple[list[Edge], list[PrivateUse]]:
    """The chipcheck modules `module` imports, and the private names it takes from them
    (`from x import _y`, and `m._y` where `m` is bound to a chipcheck module by an import)."""
    tree = ast.parse(source)
    edges: list[Edge] = []
    private: list[PrivateUse] = []
    bound: dict[str, str] = {}  # local name -> the chipcheck module it is
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _base(module, node, is_pkg)
            if not _ours(base):
                continue
            assert base is not None
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # `from pkg import module`
                    edges.append(Edge(module, sub, node.lineno))
                    bound[alias.asname or alias.name] = sub
                    continue
                edges.append(Edge(module, base, node.lineno))
                if _private(alias.name):
                    private.append(PrivateUse(module, base, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _ours(alias.name):
                    edges.append(Edge(module, alias.name, node.lineno))
                    if alias.asname:
                        bound[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and _private(node.attr)):
            private.append(PrivateUse(module, bound[node.value.id], node.attr, node.lineno))
    return [e for e in edges if e.imported != module], private


def layer(module: str) -> str:
    """The layer a chipcheck module belongs to (KeyError: a new top-level module must be placed)."""
    if module in CORE_MODULES:
        return "core"
    if module in APP_MODULES or module.startswith("chipcheck.cli."):
        return "app"
    top = module.split(".")[1]
    if top in ("model", "probes", "reports", "reproducers", "fleet"):
        return top
    raise KeyError(f"{module}: which layer is it in? add it to test_layers.py")


def upward(edges: list[Edge], exceptions: dict[tuple[str, str], str]) -> list[str]:
    """Edges the layering forbids, minus the listed exceptions, as readable lines."""
    bad = []
    for e in edges:
        if (e.importer, e.imported) in exceptions:
            continue
        if e.imported in NOBODY_IMPORTS and not e.importer.startswith(e.imported + "."):  # its own __main__ may
            bad.append(f"{e.importer}:{e.line} imports {e.imported}, which nothing may import")
        elif layer(e.imported) not in MAY_IMPORT[layer(e.importer)]:
            bad.append(f"{e.importer}:{e.line} imports {e.imported} ({layer(e.importer)} -> {layer(e.imported)})")
    return sorted(set(bad))


def cycles(edges: list[Edge]) -> list[list[str]]:
    """Groups of modules that import each other, directly or around a circle (Tarjan's SCC)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.importer, set()).add(e.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def scan_all(sources: dict[str, tuple[str, bool]]) -> tuple[list[Edge], list[PrivateUse]]:
    edges: list[Edge] = []
    private: list[PrivateUse] = []
    for mod, (src, is_pkg) in sources.items():
        e, p = scan(mod, src, is_pkg, set(sources))
        edges += e
        private += p
    return edges, private


@pytest.fixture(scope="module")
def package() -> tuple[list[Edge], list[PrivateUse]]:
    sources = package_sources()
    assert "chipcheck.results" in sources and "chipcheck.fleet.worker" in sources, "the walk missed the package"
    return scan_all(sources)


def test_no_private_names_cross_modules(package: tuple[list[Edge], list[PrivateUse]]) -> None:
    _, private = package
    assert not private, "private names used from another module (give them a public name in their home):\n" + \
        "\n".join(f"  {p.importer}:{p.line} uses {p.owner}.{p.name}" for p in private)


def test_no_upward_imports(package: tuple[list[Edge], list[PrivateUse]]) -> None:
    edges, _ = package
    bad = upward(edges, ALLOWED_EXCEPTIONS)
    assert not bad, "imports against the layering (see this file's docstring):\n" + "\n".join(f"  {b}" for b in bad)


def test_every_exception_is_still_needed(package: tuple[list[Edge], list[PrivateUse]]) -> None:
    edges, _ = package
    present = {(e.importer, e.imported) for e in edges}
    stale = sorted(k for k in ALLOWED_EXCEPTIONS if k not in present)
    assert not stale, f"fixed (or moved): drop from ALLOWED_EXCEPTIONS: {stale}"


def test_no_import_cycles(package: tuple[list[Edge], list[PrivateUse]]) -> None:
    edges, _ = package
    assert cycles(edges) == []


def test_every_module_has_a_layer(package: tuple[list[Edge], list[PrivateUse]]) -> None:
    for mod in package_sources():
        layer(mod)


# ---- the checker itself can fail -------------------------------------------------------------------


def _synthetic(files: dict[str, str], tmp_path: Path) -> tuple[list[Edge], list[PrivateUse]]:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return scan_all(package_sources(tmp_path))


def test_checker_flags_private_imports_and_attribute_access(tmp_path: Path) -> None:
    edges, private = _synthetic({
        "__init__.py": "",
        "fleet/__init__.py": "",
        "fleet/worker.py": "def _run_one(): ...\nclass _HostLock: ...\n__all__ = []\n",
        "fleet/distributed.py": "from .worker import _HostLock, __all__\n"
                                "def f():\n    from . import worker as w\n    return w._run_one()\n",
        "probes/__init__.py": "",
        "probes/memory.py": "from . import generator as g\nfrom chipcheck.probes import _inner\nx = g._GOLDEN\n",
        "probes/generator.py": "_GOLDEN = 1\n",
        "probes/_inner.py": "",
    }, tmp_path)
    found = {(p.importer, p.owner, p.name) for p in private}
    assert found == {("chipcheck.fleet.distributed", "chipcheck.fleet.worker", "_HostLock"),
                     ("chipcheck.fleet.distributed", "chipcheck.fleet.worker", "_run_one"),
                     ("chipcheck.probes.memory", "chipcheck.probes.generator", "_GOLDEN")}
    assert ("chipcheck.probes.memory", "chipcheck.probes._inner") in {(e.importer, e.imported) for e in edges}


def test_checker_flags_upward_edges_and_honours_exceptions(tmp_path: Path) -> None:
    edges, _ = _synthetic({
        "__init__.py": "",
        "results.py": "",
        "cli.py": "from .fleet import runner\n",
        "model/__init__.py": "",
        "model/gpt.py": "from ..probes import generator\nfrom .. import results\n",
        "probes/__init__.py": "",
        "probes/generator.py": "",
        "probes/matmul.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..fleet.runner import X\n",
        "fleet/__init__.py": "",
        "fleet/runner.py": "def main():\n    from ..cli import main\n",
        "reports/__init__.py": "",
        "reports/view.py": "import chipcheck.fleet.launch\n",
        "fleet/launch.py": "",
    }, tmp_path)
    bad = upward(edges, {})
    assert [b.split(":")[0] for b in bad] == ["chipcheck.fleet.runner", "chipcheck.model.gpt",
                                              "chipcheck.probes.matmul", "chipcheck.reports.view"]
    assert "nothing may import" in bad[0]
    assert upward(edges, {("chipcheck.model.gpt", "chipcheck.probes.generator"): "why"}) == \
        [b for b in bad if not b.startswith("chipcheck.model.gpt")]
    assert cycles(edges) == [["chipcheck.cli", "chipcheck.fleet.runner"]]


def test_the_probe_registry_loads_without_jax() -> None:
    """jax is an optional extra: the registry imports every module of probes/, the JAX entry points
    included, so none of them may import jax at import time (a fresh venv's `chipcheck run` crashed
    on probes/jax_retest.py's top-level import of backends.jax)."""
    code = ("import sys; sys.modules['jax'] = None\n"  # `import jax` raises ImportError, as where it is absent
            "from chipcheck.probes import base\n"
            "names = base.registry()\n"
            "assert 'retest' in names and names['retest'].jax == 'jax_retest', names\n"
            "assert 'jax' not in sys.modules or sys.modules['jax'] is None\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
