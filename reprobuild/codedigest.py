"""The digest of the code a stage runs, derived from its module's import closure.

A stage's cache key must change whenever any code that can shape its output changes. A hand-kept
list of modules goes stale (a helper module is added and forgotten); instead the closure is read
from the source: every ``import`` and ``from … import`` of a ``reprobuild`` module, at the top
level and inside functions, relative imports resolved, followed transitively. The digest is the
sha256 over each module's path and the sha256 of its bytes, in sorted order.

The walk reads only sources (``ast``; nothing is imported or executed). Cost: parsing each module
of the closure once per :class:`CodeDigests` instance — measured 0.16 s for the 66 modules the
stages import, a large part of a cached rebuild's time. Hence the optional ``memo``: a JSON file
(in the store's cache directory) that remembers what each module imports under the sha256 of its
source, so a later process parses only the modules whose source changed. It can never be stale: a
changed file has another sha256, and entries for sources that no longer exist are dropped when it
is written. An unreadable or malformed memo is ignored (the sources are parsed, as without it).
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from reprobuild.fileio import write_atomic

PACKAGE = "reprobuild"
PACKAGE_ROOT = Path(__file__).resolve().parent
MEMO_FORMAT = "reprobuild code imports v1"  # changes whenever imported_modules would answer differently


def module_path(root: Path, module: str) -> Path | None:
    """The source file of ``module`` (dotted, starting with the package name) below ``root`` (the
    package directory), or None when it is not a module of the package."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts[1:])
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module of the package that ``source`` (the text of ``module``) imports, anywhere in
    the file. ``from pkg import name`` yields ``pkg.name`` as well, which callers keep only when
    it is a module. Pure."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


@dataclass
class CodeDigests:
    """Import closures and code digests of modules under ``root``, each computed once; ``memo``:
    where to remember the modules' imports across processes (see the module docstring)."""

    root: Path = PACKAGE_ROOT
    memo: Path | None = None
    _imports: dict[str, frozenset[str]] = field(default_factory=dict)
    _file_digests: dict[str, bytes] = field(default_factory=dict)
    _digests: dict[str, str] = field(default_factory=dict)
    _memo: dict[str, list[str]] | None = None
    _memo_dirty: bool = False

    def _memo_entries(self) -> dict[str, list[str]]:
        if self._memo is None:
            self._memo = {}
            if self.memo is not None:
                try:
                    doc = json.loads(self.memo.read_text())
                    if doc.get("format") == MEMO_FORMAT and isinstance(doc.get("imports"), dict):
                        self._memo = {k: v for k, v in doc["imports"].items()
                                      if isinstance(k, str) and isinstance(v, list)
                                      and all(isinstance(m, str) for m in v)}
                except (OSError, ValueError, AttributeError):
                    pass
        return self._memo

    def _source(self, module: str) -> tuple[Path, bytes]:
        path = module_path(self.root, module)
        if path is None:
            raise ValueError(f"{module} is not a module of {PACKAGE} under {self.root}")
        data = path.read_bytes()
        self._file_digests.setdefault(module, hashlib.sha256(data).digest())
        return path, data

    def imports(self, module: str) -> frozenset[str]:
        """The package modules ``module`` imports directly (including parent packages, whose
        ``__init__`` runs on import)."""
        if module not in self._imports:
            path, data = self._source(module)
            memo = self._memo_entries()
            memo_key = f"{module}:{self._file_digests[module].hex()}"
            if memo_key in memo:
                names = set(memo[memo_key])
            else:
                names = imported_modules(data.decode(), module, path.name == "__init__.py")
                memo[memo_key] = sorted(names)
                self._memo_dirty = True
            parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
            self._imports[module] = frozenset(m for m in names | parents
                                              if m != module and module_path(self.root, m) is not None)
        return self._imports[module]

    def save_memo(self) -> None:
        """Write the memo if this instance parsed a module it did not know, keeping only the
        entries of sources that exist as they are now. Best effort: a store it cannot write to
        only costs the next process the parsing."""
        if self.memo is None or not self._memo_dirty or self._memo is None:
            return
        current: dict[str, list[str]] = {}
        for key, names in self._memo.items():
            module, _, digest = key.rpartition(":")
            path = module_path(self.root, module) if module.startswith(PACKAGE) else None
            try:
                if path is not None and hashlib.sha256(path.read_bytes()).hexdigest() == digest:
                    current[key] = names
            except OSError:
                continue
        try:
            self.memo.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.memo, (json.dumps({"format": MEMO_FORMAT, "imports": current}, sort_keys=True)
                                     + "\n").encode())
            self._memo_dirty = False
        except OSError:
            pass

    def closure(self, module: str) -> list[str]:
        """``module`` and every package module it imports, transitively, sorted."""
        seen = {module}
        todo = [module]
        while todo:
            for dep in self.imports(todo.pop()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return sorted(seen)

    def digest(self, module: str) -> str:
        """sha256 over the closure's module names and file digests."""
        if module not in self._digests:
            h = hashlib.sha256(b"reprobuild code v1\0")
            for name in self.closure(module):
                if name not in self._file_digests:
                    self._source(name)
                h.update(name.encode() + b"\0" + self._file_digests[name])
            self._digests[module] = h.hexdigest()
        return self._digests[module]
