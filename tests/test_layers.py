"""The import graph of ``reprobuild/``: no cycles, and imports point one way (docs/architecture.md).

Every ``import`` and ``from … import`` is read with `ast` — top level, inside functions and under
``if TYPE_CHECKING`` alike, relative imports resolved — so an import moved into a function to
dodge a cycle still counts. A package's ``__init__`` importing its own submodules (the ``cli``
group loading its command modules) is how a package shows its face, not a cycle.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "reprobuild"

# The layers, lowest first. A module may import modules of its own layer and of the layers below
# it, never above. Patterns: "x" names the module x, "x.*" every module in package x (not x).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # errors, streaming hashes and atomic writes, INI parsing, canonical JSON, code digests:
    # the standard library only.
    ("core", ("reprobuild", "errors", "fileio", "ini", "digest", "codedigest", "checkresult", "userns", "memory")),
    # Pure formats and their thin I/O: Debian metadata and packages, image formats, keys, X.509.
    ("formats", ("debian", "debian.*", "image", "image.*", "keys", "x509", "sshsig", "sshagent", "signer", "pkcs11uri",
                 "pkcs11key", "compression")),
    # Definitions and storage: the settings table, the lockfile, the manifest, the store,
    # downloads, progress.
    ("data", ("config", "lockfile", "manifest", "store", "fetch", "mirrors", "progress", "resolve", "providerindex",
              "preflight", "workspace", "registry", "registry.reference", "registry.auth", "registry.client")),
    # The root tree: extraction, sandbox, install, settings, normalisation.
    ("rootfs", ("rootfs", "rootfs.*")),
    # What is pushed to OCI registries (uses rootfs.oci's blob and JSON helpers); references,
    # credentials and the HTTP client are data (fetch reads oci:// substituters).
    ("registry", ("registry.*",)),
    # Comparing images (used by the commands below, never using them).
    ("diff", ("diff", "diff.*")),
    # The build pipeline: stage interface, runner, context, the cache and the tool runners.
    ("pipeline", ("pipeline", "pipeline.*", "cache", "tools")),
    # The build's stages, one module each (a stage never imports another stage).
    ("stages", ("stages", "stages.*")),
    # Commands' library halves: lock, build (plan + run + publish), verify, check, attestations.
    ("commands", ("lock", "build", "provenance", "sbom", "verify", "check", "vm", "nspawn", "storeinfo",
                  "audit", "release", "publish", "verifyref", "storepush")),
    # The command line: parses, calls, renders.
    ("cli", ("cli", "cli.*", "__main__")),
)

# Modules under stages/ that are shared settings, not stages: the only stages.* a stage may import.
STAGE_SHARED = ("reprobuild.stages", "reprobuild.stages.disksettings", "reprobuild.stages.packagetree")

# Third-party modules only some modules may import (same patterns as LAYERS): the command line is
# the only user of click; progress.py is the one renderer below it.
ONLY_IN: dict[str, tuple[str, ...]] = {
    "click": ("cli", "cli.*", "__main__"),
    "rich": ("cli", "cli.*", "progress"),
}


@dataclass(frozen=True)
class Import:
    module: str  # importing module, e.g. "reprobuild.diff.disk"
    target: str  # imported module, a reprobuild module or a top-level external name
    line: int

    def where(self) -> str:
        return f"{self.module}:{self.line} imports {self.target}"


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """All imports in one module; reprobuild targets resolved to the module that defines them."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                if node.level - 1 > len(parts) - 1:
                    raise AssertionError(f"{name}:{node.lineno}: relative import beyond the package")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            # "from reprobuild.diff import disk" imports the module reprobuild.diff.disk.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] != "reprobuild":
                out.append(Import(name, t.split(".")[0], node.lineno))
                continue
            while t not in modules:
                t = t.rpartition(".")[0]
            if t != name:
                out.append(Import(name, t, node.lineno))
    return out


def import_graph(root: Path = PACKAGE) -> tuple[dict[str, Path], list[Import]]:
    modules = module_files(root)
    return modules, [i for m, p in modules.items() for i in imports_of(m, p, modules)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def matches(module: str, patterns: tuple[str, ...]) -> bool:
    short = module.removeprefix("reprobuild.") if module != "reprobuild" else "reprobuild"
    return any(short == p or (p.endswith(".*") and short.startswith(p[:-1])) for p in patterns)


def layer_of(module: str) -> str | None:
    return next((layer for layer, patterns in LAYERS if matches(module, patterns)), None)


def edges(modules: dict[str, Path], imports: list[Import]) -> dict[str, set[str]]:
    """module → the reprobuild modules it imports (a package's own submodules left out)."""
    out: dict[str, set[str]] = {m: set() for m in modules}
    for i in imports:
        if i.target in modules and not i.target.startswith(i.module + "."):
            out[i.module].add(i.target)
    return out


RANK = {layer: i for i, (layer, _) in enumerate(LAYERS)}


def upward_imports(modules: dict[str, Path], imports: list[Import]) -> list[str]:
    bad = []
    for i in imports:
        if i.target not in modules:
            continue
        src, dst = layer_of(i.module), layer_of(i.target)
        if src is not None and dst is not None and RANK[dst] > RANK[src]:
            bad.append(f"{i.where()} ({src} → {dst}, a higher layer)")
    return bad


# -- the checker itself --------------------------------------------------------------------------


def test_cycles_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    pkg = tmp_path / "reprobuild"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import a\n")  # a package's face: not a cycle
    (pkg / "sub" / "a.py").write_text("from reprobuild.sub.b import f\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("def g():\n    from .sub import a\n")
    graph = edges(*import_graph(pkg))
    assert graph["reprobuild.sub"] == set()
    assert graph["reprobuild.sub.b"] == {"reprobuild.c"}
    assert graph["reprobuild.c"] == {"reprobuild.sub.a"}
    assert cycles(graph) == [["reprobuild.c", "reprobuild.sub.a", "reprobuild.sub.b"]]
    (pkg / "c.py").write_text("import json\n\ndef g():\n    pass\n")
    modules, imports = import_graph(pkg)
    assert Import("reprobuild.c", "json", 1) in imports
    assert cycles(edges(modules, imports)) == []


def test_layer_table_places_modules() -> None:
    assert layer_of("reprobuild") == layer_of("reprobuild.errors") == "core"
    assert layer_of("reprobuild.image.gpt") == "formats"
    assert layer_of("reprobuild.cli") == layer_of("reprobuild.cli.build") == "cli"
    assert layer_of("reprobuild.diffuse") is None  # "diff.*" is a package, not a prefix of names


def test_an_upward_import_is_reported(tmp_path: Path) -> None:
    pkg = tmp_path / "reprobuild"
    (pkg / "image").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "image" / "__init__.py").write_text("")
    (pkg / "build.py").write_text("from reprobuild.image import gpt\n")
    (pkg / "image" / "gpt.py").write_text("def f():\n    from ..build import g\n")
    assert upward_imports(*import_graph(pkg)) == [
        "reprobuild.image.gpt:2 imports reprobuild.build (formats → commands, a higher layer)"]


# -- the package ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], list[Import]]:
    return import_graph()


def test_no_import_cycles(graph: tuple[dict[str, Path], list[Import]]) -> None:
    modules, imports = graph
    found = cycles(edges(modules, imports))
    if found:
        lines = []
        for comp in found:
            inside = sorted({i.where() for i in imports if i.module in comp and i.target in comp})
            lines.append(" ↔ ".join(comp) + "\n    " + "\n    ".join(inside))
        pytest.fail("import cycles:\n" + "\n".join(lines))


def test_every_module_has_a_layer(graph: tuple[dict[str, Path], list[Import]]) -> None:
    modules, _ = graph
    missing = [m for m in modules if layer_of(m) is None]
    assert not missing, f"add these modules to LAYERS in {__file__}: {missing}"


def test_imports_point_down_the_layers(graph: tuple[dict[str, Path], list[Import]]) -> None:
    bad = upward_imports(*graph)
    assert not bad, "\n".join(bad)


def test_core_imports_only_the_standard_library(graph: tuple[dict[str, Path], list[Import]]) -> None:
    modules, imports = graph
    bad = [i.where() for i in imports if layer_of(i.module) == "core" and i.target not in modules
           and i.target not in sys.stdlib_module_names]  # fmt: skip
    assert not bad, "\n".join(bad)


def test_click_and_rich_stay_at_the_edge(graph: tuple[dict[str, Path], list[Import]]) -> None:
    _, imports = graph
    bad = [i.where() for i in imports if i.target in ONLY_IN and not matches(i.module, ONLY_IN[i.target])]
    assert not bad, "\n".join(bad)


def test_only_cli_imports_the_cli(graph: tuple[dict[str, Path], list[Import]]) -> None:
    _, imports = graph
    bad = [i.where() for i in imports if (i.target == "reprobuild.cli" or i.target.startswith("reprobuild.cli."))
           and layer_of(i.module) != "cli"]  # fmt: skip
    assert not bad, "\n".join(bad)


def test_no_imports_by_name_outside_the_cli_group() -> None:
    """importlib.import_module / __import__ would hide an edge from this test; only the cli group
    uses it (to load its own command modules)."""
    bad = []
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if called in ("import_module", "__import__") and name != "reprobuild.cli":
                bad.append(f"{name}:{node.lineno} imports a module by name")
    assert not bad, "\n".join(bad)


def test_a_stage_never_imports_another_stage() -> None:
    modules = module_files()
    bad = [i.where() for name, path in modules.items()
           if name.startswith("reprobuild.stages.") and name not in STAGE_SHARED
           for i in imports_of(name, path, modules)
           if i.target.startswith("reprobuild.stages.") and i.target not in STAGE_SHARED]
    assert not bad, "\n".join(bad)
