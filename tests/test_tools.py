"""Tools from the lock: the sandbox runner's path mapping, tool lookup, identity and manifest."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from reprobuild import tools as t
from reprobuild.config import ImageSpec, ToolsConfig
from reprobuild.errors import LockError, ToolMissing
from reprobuild.lockfile import load_lock
from reprobuild.rootfs.sandbox import Result

REPO = Path(__file__).resolve().parent.parent


def _lock_without_tools():
    """The committed minimal lock, minus any tools set it has."""
    lock = load_lock(REPO / "lock/minimal/reprobuild.lock")
    return dataclasses.replace(lock, sets=tuple(s for s in lock.sets if s.name != "tools"))


def _tools_lock():
    """The committed minimal lock with a made-up tools set (hermetic: nothing is installed)."""
    lock = _lock_without_tools()
    image = lock.package_set("image")
    fake = [dataclasses.replace(image.packages[0], name=n, version=v, sha256=c * 64, depends=(), pre_depends=())
            for n, v, c in (("erofs-utils", "1.8.6-1", "a"), ("squashfs-tools", "1:4.6.1-1", "b"),
                            ("e2fsprogs", "1.47.2-3", "c"), ("dosfstools", "4.2-1.2", "d"),
                            ("mtools", "4.0.48-1", "e"))]
    tools = dataclasses.replace(image, name="tools", release="bookworm", packages=tuple(fake))
    return dataclasses.replace(lock, sets=lock.sets + (tools,))


def _spec(mode: str) -> ImageSpec:
    return ImageSpec(directory=Path("/nonexistent"), tools=ToolsConfig(tools_tree=mode))


def test_which_finds_tools_inside_the_tree_only(tmp_path: Path) -> None:
    (tmp_path / "usr/sbin").mkdir(parents=True)
    (tmp_path / "usr/sbin/mkfs.erofs").write_text("")
    (tmp_path / "usr/sbin/mkfs.vfat").symlink_to("mkfs.fat")  # dangling inside the host view: fine
    runner = t.TreeRunner(tmp_path, {"erofs-utils": "1.8.6-1"})
    assert runner.which("mkfs.erofs") == "/usr/sbin/mkfs.erofs"
    assert runner.which("mkfs.vfat") == "/usr/sbin/mkfs.vfat"
    with pytest.raises(ToolMissing) as e:
        runner.which("mksquashfs")
    assert "[Tools] Packages=" in e.value.hint and "squashfs-tools" in e.value.hint
    assert runner.version("mkfs.erofs") == "1.8.6-1"
    assert runner.version("mcopy") == "unknown"


def test_run_binds_paths_and_rewrites_argv_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_run_in_tree(tree, argv, env=None, *, hostname="localhost", binds=(), stdin=None, timeout=None):
        seen.update(tree=tree, argv=list(argv), env=dict(env), binds=list(binds), stdin=stdin)
        return Result(3, "out and err")

    monkeypatch.setattr("reprobuild.rootfs.sandbox.run_in_tree", fake_run_in_tree)
    work = tmp_path / "work"
    tree = work / "tree"  # nested paths: the longest prefix wins
    runner = t.TreeRunner(tmp_path / "tools")
    code, out, err = runner.run(
        ["/usr/bin/mkfs.erofs", f"-U{tree}", str(work / "fs.img"), str(tree), str(tree / "etc"), "::/EFI"],
        {"MKE2FS_CONFIG": str(work / "mke2fs.conf"), "TZ": "UTC"}, cwd=work,
        paths=((work, True), (tree, False)), input="x")
    assert (code, out, err) == (3, "out and err", "")
    assert seen["argv"] == ["/usr/bin/mkfs.erofs", f"-U{tree}", f"{t.IO_ROOT}0/fs.img", f"{t.IO_ROOT}1",
                            f"{t.IO_ROOT}1/etc", "::/EFI"]
    assert seen["env"] == {"MKE2FS_CONFIG": f"{t.IO_ROOT}0/mke2fs.conf", "TZ": "UTC"}
    assert [(b.target, b.read_only) for b in seen["binds"]] == [(f"{t.IO_ROOT}0", False), (f"{t.IO_ROOT}1", True)]
    assert seen["stdin"] == b"x"
    # A path that merely shares a prefix string is not rewritten.
    runner.run(["x", str(work) + "-other"], {}, cwd=work, paths=((work, True),))
    assert seen["argv"] == ["x", str(work) + "-other"]


def test_lock_mode_manifest_names_locked_versions() -> None:
    m = t.tools_manifest("lock", _tools_lock())
    assert m["tree"] == "lock" and m["release"] == "bookworm"
    assert m["tools"]["mkfs.erofs"] == {"package": "erofs-utils", "version": "1.8.6-1"}
    assert m["tools"]["mksquashfs"]["version"] == "1:4.6.1-1"
    assert m["tools"]["mkfs.vfat"]["package"] == "dosfstools"
    assert m["tools"]["mcopy"]["version"] == "4.0.48-1"
    assert set(m["tools"]) == set(t.TOOL_PACKAGES)


def test_lock_mode_needs_a_tools_set() -> None:
    from reprobuild.build import plan

    with pytest.raises(LockError):
        plan(_spec("lock"), _lock_without_tools(), "disk")


def test_host_mode_names_host_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    from reprobuild.image.fs import HOST
    from reprobuild.stages.tools import HostToolsStage

    monkeypatch.setattr(t, "host_versions", lambda: {k: "9.9" for k in t.TOOL_PACKAGES})
    m = t.tools_manifest("host", load_lock(REPO / "lock/minimal/reprobuild.lock"))
    assert m["tools"]["mkfs.erofs"] == {"package": "erofs-utils", "version": "9.9"}
    assert t.tool_runner(None, {}) is HOST
    import reprobuild.stages.tools as st

    monkeypatch.setattr(st, "host_versions", lambda: {k: "9.9" for k in t.TOOL_PACKAGES})
    assert HostToolsStage().inputs(None) == {"host": {k: "9.9" for k in t.TOOL_PACKAGES}}  # type: ignore[arg-type]
