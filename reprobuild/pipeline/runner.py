"""The one runner of build stages: keys from declarations, cache or run, timing, explanations.

For each stage (see :mod:`reprobuild.pipeline.stage`) the runner derives

* the **identity key**: sha256 of the canonical JSON of the stage's name and version, its
  declared options and inputs, the identity keys of its ``upstream`` and ``reads`` stages, and
  the digest of its module's import closure (:mod:`reprobuild.pipeline.codedigest`). It is known
  before anything runs, so a build whose final stage hits touches nothing else;
* for stages that read content from upstream artifacts, the **content key**: the same, with the
  content it reads (:meth:`Stage.content`) in place of the ``reads`` stages' identities. Looked up
  only when the identity key misses; a hit is recorded under the identity key as well.

Artifacts are made lazily: asking for the final stage asks for its upstream artifacts only if
it must run; a stage that must run and still lacks two or more upstream artifacts has them made
concurrently (``fs``: the configured tree and the tools tree). ``--no-cache`` is this runner with a cache that never hits and never stores.

Each stage's key parts are kept per image directory (``<store>/cache/explain/``) so that a miss
can say which declared part changed since the previous build (mkosi's cache manifest diff).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reprobuild.cache import Entry
from reprobuild.codedigest import CodeDigests
from reprobuild.digest import json_digest
from reprobuild.errors import BuildError
from reprobuild.fileio import sha256_file, write_atomic
from reprobuild.pipeline.context import BuildContext
from reprobuild.pipeline.stage import Artifact, Stage

# Bump when the meaning of keys changes in a way the code digests do not capture.
KEY_FORMAT = 2


@dataclass
class StageReport:
    """What happened to one stage: ``outcome`` is ``hit`` (identity key), ``content-hit``,
    ``built``, or ``not needed`` (a later stage was served from the cache)."""

    name: str
    key: str
    outcome: str = "not needed"
    seconds: float = 0.0
    changed: list[str] = field(default_factory=list)  # on a miss: key parts that differ from last time

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.name, "key": self.key, "outcome": self.outcome, "seconds": self.seconds,
                "changed": list(self.changed)}


def key_parts(stage: Stage, ctx: BuildContext, linked: Mapping[str, str], code: str,
              content: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON data a key is the digest of. Pure given the stage's declarations."""
    parts: dict[str, Any] = {
        "format": KEY_FORMAT, "stage": stage.name, "version": stage.version,
        "options": stage.options(ctx), "inputs": stage.inputs(ctx),
        "upstream": dict(sorted(linked.items())), "code": code,
    }
    if content is not None:
        parts["content"] = dict(content)
    return parts


def part_digests(parts: Mapping[str, Any]) -> dict[str, str]:
    """One digest per named part (``options``, ``inputs.extra_trees``, ``upstream.tree``, ``code``
    …), the unit in which a miss is explained."""
    out: dict[str, str] = {}
    for name, value in parts.items():
        if isinstance(value, dict) and name in ("options", "inputs", "upstream", "content"):
            for sub, v in value.items():
                out[f"{name}.{sub}"] = json_digest(v)
        else:
            out[name] = json_digest(value)
    return out


def changed_parts(previous: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    return sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))


class Runner:
    """Runs the planned ``stages`` of one build (in plan order; each declares its upstreams)."""

    def __init__(self, ctx: BuildContext, stages: Sequence[Stage], *, explain_name: str | None = None,
                 code: CodeDigests | None = None, output_current: Callable[[Entry], bool] | None = None) -> None:
        self.ctx = ctx
        # Whether the output a receipt names (Stage.keep_output=False) is still in place: only then
        # does the receipt serve; without a judge it never does.
        self.output_current = output_current or (lambda _entry: False)
        self.stages = {s.name: s for s in stages}
        self.order = [s.name for s in stages]
        self.code = code or CodeDigests(memo=ctx.cache.code_memo)
        self.explain_name = explain_name
        self._keys: dict[str, str] = {}
        self._parts: dict[str, dict[str, str]] = {}
        self._artifacts: dict[str, Artifact] = {}
        self.reports: dict[str, StageReport] = {}
        self._thread = threading.local()  # per thread: the stack of upstream times (_nested_times)
        self._locks = {s.name: threading.Lock() for s in stages}
        self._previous = self._load_explain()
        for s in stages:
            for dep in (*s.upstream, *s.reads):
                if dep not in self.stages or self.order.index(dep) >= self.order.index(s.name):
                    raise BuildError(f"internal error: stage {s.name} depends on {dep}, which is not planned before it")

    # -- keys ----------------------------------------------------------------------------------
    def key(self, name: str) -> str:
        """The identity key of stage ``name`` (computing its upstreams' first)."""
        if name not in self._keys:
            stage = self.stages[name]
            linked = {dep: self.key(dep) for dep in (*stage.upstream, *stage.reads)}
            parts = key_parts(stage, self.ctx, linked, self.code.digest(stage.code_module))
            self._parts[name] = part_digests(parts)
            self._keys[name] = json_digest(parts, b"reprobuild stage\0")
            self.reports[name] = StageReport(name, self._keys[name])
        return self._keys[name]

    def keys(self) -> dict[str, str]:
        """Every planned stage's identity key, in plan order (nothing is run)."""
        keys = {n: self.key(n) for n in self.order}
        self.code.save_memo()
        return keys

    def _content_key(self, stage: Stage) -> str | None:
        if not stage.reads:
            return None
        content = stage.content(self.ctx, _Access(self, stage))
        if content is None:
            return None
        linked = {dep: self.key(dep) for dep in stage.upstream}
        parts = key_parts(stage, self.ctx, linked, self.code.digest(stage.code_module), content)
        return json_digest(parts, b"reprobuild stage\0")

    # -- artifacts -----------------------------------------------------------------------------
    def artifact(self, name: str) -> Artifact:
        """Stage ``name``'s artifact: from the cache if its key hits, else made (lazily, once;
        a thread asking for an artifact another thread is making waits for it)."""
        nested = self._nested_times()
        started = time.monotonic()
        try:
            with self._locks[name]:
                if name not in self._artifacts:
                    self._artifacts[name] = self._timed_make(name, nested)
                return self._artifacts[name]
        finally:
            # Stage time excludes the upstream stages it asked for (they report their own),
            # and the wait for one that another thread was making.
            if nested:
                nested[-1] += time.monotonic() - started

    def _nested_times(self) -> list[float]:
        """This thread's stack: time spent in upstream stages, per stage being made."""
        stack = getattr(self._thread, "nested", None)
        if stack is None:
            stack = self._thread.nested = []
        return stack

    def _timed_make(self, name: str, nested: list[float]) -> Artifact:
        stage = self.stages[name]
        key = self.key(name)
        report = self.reports[name]
        cacheable = stage.cacheable(self.ctx) and stage.produces != "nothing"
        started = time.monotonic()
        nested.append(0.0)
        try:
            return self._make(stage, key, report, cacheable)
        finally:
            report.seconds = round(time.monotonic() - started - nested.pop(), 3)

    def _make_upstream_together(self, stage: Stage) -> None:
        """A stage about to run needs all its upstream artifacts: when two or more must still be
        made (e.g. ``fs`` needs the configured tree and the tools tree), make them at once, the
        first in this thread and each other one in a thread of its own. Independent stages share
        nothing but the store, which is safe for concurrent writers, and their bytes do not depend
        on the order. Every thread is waited for; the first failure is raised."""
        pending = [u for u in stage.upstream if u not in self._artifacts]
        if len(pending) < 2:
            return
        with ThreadPoolExecutor(max_workers=len(pending) - 1, thread_name_prefix="stage") as pool:
            futures = [pool.submit(self.artifact, u) for u in pending[1:]]
            try:
                self.artifact(pending[0])
            finally:
                waited = time.monotonic()
                wait(futures)
                nested = self._nested_times()
                if nested:  # the wait for the others is upstream time too
                    nested[-1] += time.monotonic() - waited
        for f in futures:
            f.result()

    def _usable(self, entry: Entry | None) -> Entry | None:
        """``entry``, unless it is a receipt whose output is no longer in place."""
        return entry if entry is None or entry.stored or self.output_current(entry) else None

    def _make(self, stage: Stage, key: str, report: StageReport, cacheable: bool) -> Artifact:
        name = stage.name
        cache = self.ctx.cache
        found = cache.get(name, key) if cacheable else None
        entry = self._usable(found)
        outcome = "hit"
        content_key = None
        if entry is None and cacheable:
            report.changed = self._changed(name) if found is None else [
                "the output is gone or was changed since it was written (the store keeps no copy of it)"]
            # A content key serves lookups only: none with the cache off (--no-cache), where
            # computing it would wait for the upstream trees it reads.
            content_key = self._content_key(stage) if cache.enabled else None
            if content_key is not None:
                entry = self._usable(cache.get(name, content_key))
                if entry is not None:
                    outcome = "content-hit"
                    cache.alias(entry, key)
        if entry is not None:
            art = self._served(stage, key, entry)
            report.outcome = outcome
            self.ctx.say(f"{name}: cached")
            return art
        if not cacheable:
            report.changed = self._changed(name)
        art = self._run(stage, key, content_key)
        report.outcome = "built"
        return art

    def _served(self, stage: Stage, key: str, entry: Entry) -> Artifact:
        art = Artifact(stage.name, key, dict(entry.meta), entry=entry, from_cache=True)
        if stage.produces == "tree":
            if stage.keep_extracted:
                art.path = self.ctx.cache.tree_dir(entry)
            else:
                art.path = self.ctx.tree_path(stage.name)
                self.ctx.cache.restore_tree(entry, art.path)
                art.owned = True
        return art

    def _run(self, stage: Stage, key: str, content_key: str | None) -> Artifact:
        ctx, cache = self.ctx, self.ctx.cache
        cacheable = stage.cacheable(ctx) and stage.produces != "nothing" and cache.enabled
        access = _Access(self, stage)
        self._make_upstream_together(stage)
        if stage.produces == "tree":
            # A tree kept extracted in the store (the tools tree, the build environment) is made on
            # the store's file system and renamed into it; any other tree in the build's workspace
            # (in memory when it fits, see reprobuild.workspace; stages/install.py says why the
            # installed tree is one of those).
            scratch = cache.scratch(stage.name) if cacheable and stage.keep_extracted else None
            out = scratch / "tree" if scratch is not None else ctx.tree_path(stage.name)
            try:
                meta = stage.run(ctx, access, out)
                art = Artifact(stage.name, key, meta, path=out, owned=True)
                if cacheable:
                    entry = cache.put_tree(stage.name, key, out, ctx.epoch, meta, keep=stage.keep_extracted)
                    if entry is None and stage.keep_extracted:
                        raise BuildError(f"the {stage.name} tree could not be cached", hint="build with --no-cache")
                    art.entry = entry
                    if stage.keep_extracted and entry is not None:
                        art.path, art.owned = cache.tree_dir(entry), False
            finally:
                if scratch is not None:
                    shutil.rmtree(scratch, ignore_errors=True)
        elif stage.produces == "file":
            out = ctx.work / (stage.file_name or stage.name)
            meta = stage.run(ctx, access, out)
            art = Artifact(stage.name, key, meta, path=out, owned=True)
            final = stage.name == self.order[-1]
            if cacheable and final and not stage.keep_output:
                # Only a receipt: the output is remade from the cached upstream files when it is gone.
                sha = meta.get("sha256") if isinstance(meta.get("sha256"), str) else sha256_file(out)
                art.entry = cache.put_receipt(stage.name, key, sha, out.stat().st_size, meta)
            elif cacheable:
                # An upstream file is only read by the stages after it and removed with the work
                # directory: the store takes it as it is (a hard link, no copy). The final output
                # is the user's file (it may be booted read-write): the store keeps a copy of it.
                art.entry = cache.put_file(stage.name, key, out, meta, link=not final)
        else:
            meta = stage.run(ctx, access, ctx.work / stage.name)
            art = Artifact(stage.name, key, meta)
        if art.entry is not None and content_key is not None:
            cache.alias(art.entry, content_key)
        return art

    def file(self, name: str) -> Path:
        """The artifact of file stage ``name`` as a file to read: one made by this build, or a
        cached one read where the store keeps it, its hash verified first. Stages only read
        upstream files (a file this build made is the store's object too: a hard link)."""
        art = self.artifact(name)
        if art.path is None:
            assert art.entry is not None
            art.path = self.ctx.cache.verified_path(art.entry)
        return art.path

    # -- explanations --------------------------------------------------------------------------
    def _explain_file(self) -> Path | None:
        if self.explain_name is None or not self.ctx.cache.enabled:
            return None
        return self.ctx.cache.index / "explain" / f"{self.explain_name}.json"

    def _load_explain(self) -> dict[str, dict[str, str]]:
        path = self._explain_file()
        try:
            doc = json.loads(path.read_text()) if path is not None else {}
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def _changed(self, name: str) -> list[str]:
        previous = self._previous.get(name)
        if not isinstance(previous, dict):
            return ["no previous build of this image"]
        return changed_parts(previous, self._parts[name]) or ["nothing declared (the cached entry is gone)"]

    def save_explain(self) -> None:
        """Remember every computed stage's key parts for the next build's explanations."""
        path = self._explain_file()
        if path is None:
            return
        doc = {**self._previous, **self._parts}
        write_atomic(path, (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode())

    def timings(self) -> dict[str, float]:
        return {n: r.seconds for n, r in self.reports.items() if r.outcome != "not needed"}

    def hits(self) -> list[str]:
        return [n for n in self.order if n in self.reports and self.reports[n].outcome in ("hit", "content-hit")]

    def report_list(self) -> list[StageReport]:
        for n in self.order:
            self.key(n)
        return [self.reports[n] for n in self.order]


class _Access:
    """A running stage's view of the runner: only the stages it declared."""

    def __init__(self, runner: Runner, stage: Stage) -> None:
        self._runner = runner
        self._stage = stage

    def _check(self, name: str) -> None:
        if name not in self._stage.upstream and name not in self._stage.reads:
            raise BuildError(f"internal error: stage {self._stage.name} uses {name}, which it did not declare")

    def artifact(self, name: str) -> Artifact:
        self._check(name)
        return self._runner.artifact(name)

    def file(self, name: str) -> Path:
        self._check(name)
        return self._runner.file(name)

    def meta(self, name: str) -> Mapping[str, Any]:
        return self.artifact(name).meta

