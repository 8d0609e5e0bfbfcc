"""The stage pipeline: keys derived from what each stage declares and from the code it imports.

* stage keys from a real definition and lock: stable, independent of where the checkout is, and
  changed exactly by the settings and content each stage declares;
* the code digest is the import closure of the stage's module: editing any module of a stage's
  closure changes that stage's key and every key after it, and no earlier one (checked for every
  module of every closure, in a copy of the package);
* a real disk build from a copy of the package whose ``x509.py`` was edited misses the stage
  that writes the verity signature (and the output) and still reuses the earlier stages.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from reprobuild.build import plan
from reprobuild.cache import Cache
from reprobuild.codedigest import CodeDigests, imported_modules
from reprobuild.config import load_spec
from reprobuild.errors import BuildError
from reprobuild.lockfile import load_lock
from reprobuild.pipeline.context import BuildContext
from reprobuild.pipeline.runner import Runner
from reprobuild.pipeline.stage import Stage
from reprobuild.store import Store

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "reprobuild"


@pytest.fixture()
def definition(tmp_path: Path) -> Path:
    """lock/minimal's definition (bookworm minbase) with an extra tree, built as a disk."""
    d = tmp_path / "def"
    (d / "extra/etc").mkdir(parents=True)
    (d / "extra/etc/motd").write_text("hello\n")
    conf = (REPO / "lock/minimal/reprobuild.conf").read_text()
    conf = "\n".join(line for line in conf.splitlines() if not line.startswith("LockKey"))
    (d / "reprobuild.conf").write_text(conf + "\n[Content]\nExtraTrees=extra\n")
    return d


def _keys(d: Path, tmp: Path, lock=None, overrides=(), fmt: str = "disk", code: CodeDigests | None = None):
    lock = lock or load_lock(REPO / "lock/minimal/reprobuild.lock")
    spec = load_spec(d, list(overrides))
    ctx = BuildContext(spec=spec, lock=lock, store=Store(tmp / "store"), cache=Cache(Store(tmp / "store"),
                       enabled=False), work=tmp, format=fmt)
    return Runner(ctx, plan(spec, lock, fmt), code=code).keys()


def test_keys_are_stable_and_independent_of_the_checkout_place(definition: Path, tmp_path: Path) -> None:
    a = _keys(definition, tmp_path)
    assert list(a) == ["tools", "install", "tree", "fs", "ddi"]
    assert a == _keys(definition, tmp_path)
    moved = tmp_path / "elsewhere" / "def"
    moved.parent.mkdir()
    os.rename(definition, moved)
    os.utime(moved / "extra/etc/motd", (1, 1))  # times and place are not inputs
    assert _keys(moved, tmp_path) == a


def _changed(a: dict[str, str], b: dict[str, str]) -> set[str]:
    return {n for n in a if a[n] != b[n]}


def test_extra_tree_edit_changes_the_tree_and_what_follows(definition: Path, tmp_path: Path) -> None:
    a = _keys(definition, tmp_path)
    (definition / "extra/etc/motd").write_text("edited\n")
    b = _keys(definition, tmp_path)
    assert _changed(a, b) == {"tree", "fs", "ddi"}
    (definition / "extra/etc/motd").chmod(0o600)
    assert _keys(definition, tmp_path)["tree"] not in (a["tree"], b["tree"])


def test_package_change_changes_install_and_later(definition: Path, tmp_path: Path) -> None:
    lock = load_lock(REPO / "lock/minimal/reprobuild.lock")
    image = lock.package_set("image")
    first = image.packages[0]
    changed = dataclasses.replace(lock, sets=tuple(
        dataclasses.replace(image, packages=(dataclasses.replace(first, sha256="0" * 64),) + image.packages[1:])
        if s.name == "image" else s for s in lock.sets))
    assert _changed(_keys(definition, tmp_path, lock), _keys(definition, tmp_path, changed)) == {
        "install", "tree", "fs", "ddi"}


def test_tools_change_changes_tools_and_what_uses_them(definition: Path, tmp_path: Path) -> None:
    lock = load_lock(REPO / "lock/minimal/reprobuild.lock")
    tools = lock.package_set("tools")
    bumped = dataclasses.replace(tools, packages=(dataclasses.replace(tools.packages[0], version="99:1"),)
                                 + tools.packages[1:])
    lock2 = dataclasses.replace(lock, sets=tuple(bumped if s.name == "tools" else s for s in lock.sets))
    assert _changed(_keys(definition, tmp_path, lock), _keys(definition, tmp_path, lock2)) == {"tools", "fs", "ddi"}


@pytest.mark.parametrize("override, changed", [
    ("Content.Hostname=other", {"install", "tree", "fs", "ddi"}),  # the hostname maintainer scripts see
    ("Content.Locale=de_DE.UTF-8", {"tree", "fs", "ddi"}),
    ("Content.RemoveFiles=/usr/share/doc/*", {"tree", "fs", "ddi"}),
    ("Content.RootPassword=secret", {"tree", "fs", "ddi"}),
    ("Build.RootFilesystem=squashfs", {"fs", "ddi"}),
    ("Build.Verity=no", set()),  # needs ext4: checked below
    ("Distribution.Mirror=http://mirror.invalid/debian", set()),  # where bytes come from, not which
    ("Build.Substituters=http://cache.invalid", set()),
    ("Build.ImageId=fooos", {"tree", "fs", "ddi"}),  # os-release
    ("Build.ImageVersion=2", {"tree", "fs", "ddi"}),
    ("Signing.ReleaseKey=release@example.invalid", set()),  # only 'reprobuild release' reads it
])
def test_settings_change_exactly_the_stages_that_declare_them(definition: Path, tmp_path: Path, override: str,
                                                              changed: set[str]) -> None:
    if override == "Build.Verity=no":
        base = ("Build.RootFilesystem=ext4",)
        a = _keys(definition, tmp_path, overrides=base)
        b = _keys(definition, tmp_path, overrides=(*base, override))
        assert _changed(a, b) == {"fs", "ddi"}  # read-only or not, and the partitions
        return
    assert _changed(_keys(definition, tmp_path), _keys(definition, tmp_path, overrides=(override,))) == changed


def test_updates_settings_and_key_content_change_the_tree_and_what_follows(definition: Path, tmp_path: Path) -> None:
    base = ("Build.ImageId=fooos", "Build.ImageVersion=1")
    plain = _keys(definition, tmp_path, overrides=base)
    source = (*base, "Updates.Source=/run/releases")
    updated = _keys(definition, tmp_path, overrides=source)
    assert _changed(plain, updated) == {"tree", "fs", "ddi"}
    assert _changed(updated, _keys(definition, tmp_path, overrides=(*source, "Updates.InstancesMax=3"))) == {
        "tree", "fs", "ddi"}
    key = tmp_path / "release.gpg"
    key.write_bytes(b"\x98one")
    with_key = _keys(definition, tmp_path, overrides=(*source, f"Updates.PublicKey={key}"))
    assert _changed(updated, with_key) == {"tree", "fs", "ddi"}
    key.write_bytes(b"\x98two")  # the key's bytes, not its path, enter the tree's key
    assert _changed(with_key, _keys(definition, tmp_path, overrides=(*source, f"Updates.PublicKey={key}"))) == {
        "tree", "fs", "ddi"}


def test_epoch_changes_every_key(definition: Path, tmp_path: Path) -> None:
    lock = load_lock(REPO / "lock/minimal/reprobuild.lock")
    a = _keys(definition, tmp_path, lock)
    b = _keys(definition, tmp_path, dataclasses.replace(lock, source_date_epoch=lock.source_date_epoch + 1))
    assert _changed(a, b) == set(a)


def test_imported_modules_sees_every_form_of_import() -> None:
    source = ("import reprobuild.errors\nfrom reprobuild import fileio\nfrom . import sibling\n"
              "from ..image import gpt\nimport json\n"
              "def f():\n    from reprobuild.image.verity import hash_file\n")
    found = imported_modules(source, "reprobuild.stages.fs")
    assert {"reprobuild.errors", "reprobuild.fileio", "reprobuild.stages.sibling", "reprobuild.image.gpt",
            "reprobuild.image.verity"} <= found
    assert not any(m == "json" for m in found)


def test_the_import_memo_saves_parsing_and_never_goes_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "pkg" / "reprobuild"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    memo = tmp_path / "memo.json"
    first = CodeDigests(copy, memo=memo)
    digest = first.digest("reprobuild.stages.fs")
    first.save_memo()
    assert memo.is_file()

    from reprobuild import codedigest

    parsed: list[str] = []
    real = codedigest.imported_modules
    monkeypatch.setattr(codedigest, "imported_modules", lambda src, module, pkg=False: parsed.append(module) or real(src, module, pkg))
    again = CodeDigests(copy, memo=memo)
    assert again.digest("reprobuild.stages.fs") == digest
    assert parsed == [], "every module's imports came from the memo"

    # An edit that adds an import: that module alone is parsed again, and its imports follow it.
    gpt = copy / "image" / "ids.py"
    gpt.write_text(gpt.read_text() + "\nimport reprobuild.progress  # an edit\n")
    edited = CodeDigests(copy, memo=memo)
    assert edited.digest("reprobuild.stages.fs") != digest
    assert parsed == ["reprobuild.image.ids"]
    assert "reprobuild.progress" in edited.imports("reprobuild.image.ids")
    edited.save_memo()
    keys = json.loads(memo.read_text())["imports"]
    assert sum(k.startswith("reprobuild.image.ids:") for k in keys) == 1, "the old source's entry is dropped"

    memo.write_text("{not json")
    assert CodeDigests(copy, memo=memo).digest("reprobuild.stages.fs") == edited.digest("reprobuild.stages.fs")


def _stage_closures(definition: Path, tmp: Path, code: CodeDigests) -> dict[str, list[str]]:
    lock = load_lock(REPO / "lock/minimal/reprobuild.lock")
    spec = load_spec(definition)
    return {s.name: code.closure(s.code_module) for s in plan(spec, lock, "disk")}


def test_editing_any_module_of_a_closure_changes_that_stage_and_every_later_one(definition: Path,
                                                                               tmp_path: Path) -> None:
    copy = tmp_path / "pkg" / "reprobuild"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    closures = _stage_closures(definition, tmp_path, CodeDigests(copy))
    assert "reprobuild.x509" in closures["ddi"], "the verity signature's certificate fingerprint"
    before = _keys(definition, tmp_path, code=CodeDigests(copy))
    order = list(before)
    modules = sorted({m for c in closures.values() for m in c})
    assert len(modules) > 30
    for module in modules:
        path = copy.joinpath(*module.split(".")[1:])
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        original = path.read_bytes()
        path.write_bytes(original + b"\n# an edit\n")
        try:
            after = _keys(definition, tmp_path, code=CodeDigests(copy))
        finally:
            path.write_bytes(original)
        changed = _changed(before, after)
        first = min(order.index(n) for n in order if module in closures[n])
        own = {n for n in order if module in closures[n]}
        assert own <= changed, module
        # Every stage after the first one that imports it changes (their keys chain), no earlier one.
        downstream = set(order[first:])
        assert changed <= downstream, (module, changed)
        for name in changed - own:
            assert any(dep in changed for dep in _deps(definition, name)), (module, name)


def _deps(definition: Path, name: str) -> tuple[str, ...]:
    lock = load_lock(REPO / "lock/minimal/reprobuild.lock")
    stage = {s.name: s for s in plan(load_spec(definition), lock, "disk")}[name]
    return (*stage.upstream, *stage.reads)


# -- a real build from an edited copy of the package ----------------------------------------------


def _build(pkg_parent: Path, d: Path, store: Path, out: Path) -> dict:
    env = {**os.environ, "REPROBUILD_STORE": str(store), "PYTHONPATH": str(pkg_parent) + os.pathsep + str(REPO)}
    env.pop("SOURCE_DATE_EPOCH", None)
    r = subprocess.run([sys.executable, "-m", "reprobuild", "build", "-C", str(d), "--locked", "--offline",
                        "-o", str(out), "--json"], env=env, text=True, capture_output=True, timeout=600,
                       cwd=pkg_parent, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def _disk_definition(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The one-package fixture as a signed-verity disk (hermetic): (definition, a private copy of
    the package to edit, store)."""
    from dataclasses import replace

    from fixtures.make_host_base import build_host_base
    from reprobuild.lockfile import save_lock
    from tests.check_fixture import make_definition

    if shutil.which("mkfs.erofs") is None:
        pytest.skip("mkfs.erofs (erofs-utils) is not installed")
    d = make_definition(tmp_path / "fx", "http://127.0.0.1:9/unused", leak=False,
                        base_deb=build_host_base(tmp_path / "hb"))
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "reprobuild", "keygen", "--verity", "--out", str(keys / "verity")],
                   check=True, capture_output=True, cwd=REPO)
    conf = (d / "reprobuild.conf").read_text().replace("Format=tar", "Format=disk")
    conf += f"\n[Signing]\nVerityKey={keys}/verity.key\nVerityCertificate={keys}/verity.crt\n"
    (d / "reprobuild.conf").write_text(conf)
    spec = load_spec(d)
    save_lock(replace(load_lock(d / "reprobuild.lock"), config_digest=spec.digest(), config=spec.digest_input()),
              d / "reprobuild.lock")
    parent = tmp_path / "pkg"
    shutil.copytree(PACKAGE, parent / "reprobuild", ignore=shutil.ignore_patterns("__pycache__"))
    return d, parent, tmp_path / "fx/store"


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_store_keeps_a_receipt_of_the_disk_and_remakes_it_from_the_cached_file_system(tmp_path: Path) -> None:
    d, parent, store = _disk_definition(tmp_path)
    a = tmp_path / "a/image.raw"
    first = _build(parent, d, store, a.parent)
    sha = first["manifest"]["sha256"]
    assert _sha256(a) == sha
    assert not Store(store).has(sha)  # no second copy of the disk
    (receipt,) = (json.loads(p.read_text()) for p in (store / "cache/ddi").glob("*.json"))
    assert receipt["stored"] is False and receipt["object"] == sha
    inode = os.stat(a).st_ino

    # In place and unchanged: served by the receipt, the file is not even rewritten.
    again = _build(parent, d, store, a.parent)
    assert again["cache_hits"] == ["ddi"] and os.stat(a).st_ino == inode

    def remade(out: Path) -> dict:
        doc = _build(parent, d, store, out.parent)
        stages = {s["stage"]: s for s in doc["stages"]}
        assert stages["ddi"]["outcome"] == "built", stages["ddi"]
        assert stages["ddi"]["changed"] == [
            "the output is gone or was changed since it was written (the store keeps no copy of it)"]
        assert stages["fs"]["outcome"] == "hit" and stages["install"]["outcome"] == "not needed"
        assert doc["manifest"]["sha256"] == sha == _sha256(out)
        return doc

    remade(tmp_path / "c/image.raw")  # another directory
    with open(a, "r+b") as f:  # changed in place (booted read-write, say)
        f.seek(8192)
        f.write(b"changed")
    remade(a)
    # gc keeps what remaking needs (the file system), and what the next edit needs though the
    # remakes never looked at it (the installed tree): this image's root adds to the previous one.
    Store(store).gc()
    (install,) = (json.loads(p.read_text()) for p in (store / "cache/install").glob("*.json"))
    assert Store(store).has(install["object"])
    (tmp_path / "c/image.raw").unlink()
    remade(tmp_path / "c/image.raw")
    assert Store(store).verify().ok


def test_an_x509_edit_misses_the_verity_signature_stage(tmp_path: Path) -> None:
    d, parent, store = _disk_definition(tmp_path)
    first = _build(parent, d, store, tmp_path / "a")
    assert first["cache_hits"] == []
    # The store took the intermediate files (fs, esp) by hard links; the output is the user's
    # own copy, writable, never an inode of the store.
    out = tmp_path / "a/image.raw"
    assert os.stat(out).st_nlink == 1 and stat.S_IMODE(os.stat(out).st_mode) == 0o644
    assert Store(store).verify().ok
    assert _build(parent, d, store, tmp_path / "a")["cache_hits"] == ["ddi"]  # nothing else is looked at

    with open(parent / "reprobuild/x509.py", "a") as f:
        f.write("\n# an edit that changes no byte of the output\n")
    edited = _build(parent, d, store, tmp_path / "b")
    outcomes = {s["stage"]: s for s in edited["stages"]}
    assert outcomes["ddi"]["outcome"] == "built" and outcomes["ddi"]["changed"] == ["code"]
    assert outcomes["fs"]["outcome"] == "hit"  # its closure does not include x509
    assert edited["manifest"]["sha256"] == first["manifest"]["sha256"]
    validate_manifest(first["manifest"])
    written = json.loads((tmp_path / "a/image.raw.manifest.json").read_text())
    assert written == first["manifest"] and written["format"] == "disk" and written["verity"] == "signed"


def validate_manifest(doc: dict) -> None:
    import jsonschema

    schema = json.loads((PACKAGE / "manifest.schema.json").read_text())
    jsonschema.validate(doc, schema)


def test_manifest_schema_rejects_what_the_build_never_writes() -> None:
    import jsonschema

    good = {"format": "tar", "lock_digest": "sha256:" + "0" * 64, "config_digest": "c", "source_date_epoch": 1,
            "release": "trixie", "architecture": "amd64", "packages": ["base-files=13:amd64"],
            "sha256": "1" * 64, "size": 10}
    validate_manifest(good)
    for bad in ({**good, "format": "ddi"}, {**good, "surprise": 1}, {k: v for k, v in good.items() if k != "sha256"},
                {**good, "packages": ["no version"]}):
        with pytest.raises(jsonschema.ValidationError):
            validate_manifest(bad)


# -- the runner makes a stage's missing upstream artifacts concurrently ----------------------------
class _Slow(Stage):
    """A file stage that records when and in which thread it ran (and can fail)."""

    code_module = "reprobuild.pipeline.stage"  # its key's code digest: any module of the package

    def __init__(self, name: str, log: list, fail: bool = False, upstream: tuple[str, ...] = ()) -> None:
        self.name, self.log, self.fail, self.upstream = name, log, fail, upstream  # type: ignore[misc]

    def run(self, ctx: BuildContext, up, out: Path) -> dict:
        start = time.monotonic()
        for u in self.upstream:
            up.artifact(u)
        time.sleep(0.4)
        self.log.append((self.name, threading.get_ident(), start, time.monotonic()))
        if self.fail:
            raise BuildError(f"{self.name} failed")
        out.write_text(self.name)
        return {}


def _runner(tmp: Path, stages: list[Stage]) -> Runner:
    lock = load_lock(REPO / "lock/minimal/reprobuild.lock")
    spec = load_spec(REPO / "lock/minimal")
    store = Store(tmp / "store")
    ctx = BuildContext(spec=spec, lock=lock, store=store, cache=Cache(store, enabled=False), work=tmp, format="tar")
    return Runner(ctx, stages)


def test_missing_upstream_artifacts_are_made_concurrently(tmp_path: Path) -> None:
    log: list = []
    runner = _runner(tmp_path, [_Slow("a", log), _Slow("b", log), _Slow("c", log, upstream=("a", "b"))])
    runner.artifact("c")
    runs = {name: (thread, start, end) for name, thread, start, end in log}
    assert set(runs) == {"a", "b", "c"}
    (ta, sa, ea), (tb, sb, eb) = runs["a"], runs["b"]
    assert ta != tb, "a and b ran in the same thread"
    assert sa < eb and sb < ea, "a and b did not overlap in time"
    # Each stage's time is its own: c's excludes a's and b's.
    reports = {r.name: r for r in runner.report_list()}
    assert all(r.outcome == "built" for r in reports.values())
    assert reports["c"].seconds < 0.7 and reports["a"].seconds >= 0.4 and reports["b"].seconds >= 0.4


def test_a_failing_concurrent_upstream_fails_the_build_after_every_thread_ended(tmp_path: Path) -> None:
    log: list = []
    runner = _runner(tmp_path, [_Slow("a", log), _Slow("b", log, fail=True), _Slow("c", log, upstream=("a", "b"))])
    with pytest.raises(BuildError, match="b failed"):
        runner.artifact("c")
    assert sorted(name for name, *_ in log) == ["a", "b"]  # a finished; c never ran
