"""No surprises in the image: the manifest's ``added_files`` names every path reprobuild wrote,
changed or removed with the setting that caused it, and ``reprobuild verify --audit`` lists what
no package shipped, what differs from the package and what is missing — hermetic, with the
host-made base package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from fixtures.make_host_base import build_host_base
from reprobuild.audit import DPKG_DATABASE, UNEXPLAINED
from reprobuild.config import load_spec
from reprobuild.lockfile import load_lock, save_lock
from tests.check_fixture import make_definition
from tests.test_pipeline import validate_manifest

REPO = Path(__file__).resolve().parent.parent


def _reprobuild(store: Path, *args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REPROBUILD_STORE": str(store)}
    if path is not None:
        env["PATH"] = path
    env.pop("SOURCE_DATE_EPOCH", None)
    return subprocess.run([sys.executable, "-m", "reprobuild", *args], env=env, text=True, capture_output=True,
                          timeout=600, cwd=REPO, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fixture definition (with its leaking post-installation script) plus settings that
    write, change and remove files, built as a tar and as a directory."""
    work = tmp_path_factory.mktemp("audit")
    d = make_definition(work / "fx", "http://127.0.0.1:9/unused", leak=True, base_deb=build_host_base(work / "hb"))
    (d / "extra/etc/app").mkdir(parents=True)
    (d / "extra/etc/app/app.conf").write_text("answer=42\n")
    (d / "extra/etc/app/link").symlink_to("app.conf")
    (d / "extra/var/lib/systemd").mkdir(parents=True)
    (d / "extra/var/lib/systemd/random-seed").write_bytes(b"not random")  # normalisation removes it
    conf = (d / "reprobuild.conf").read_text()
    (d / "reprobuild.conf").write_text(conf + "\n[Content]\nExtraTrees=extra\nAutologin=yes\nRemoveFiles=/usr/bin/sleep\n"
                                       "MachineId=0123456789abcdef0123456789abcdef\n")  # fmt: skip
    spec = load_spec(d)
    save_lock(replace(load_lock(d / "reprobuild.lock"), config_digest=spec.digest(), config=spec.digest_input()),
              d / "reprobuild.lock")
    store = work / "fx/store"
    for fmt, out in (("tar", work / "out-tar"), ("directory", work / "out-dir"), ("oci", work / "out-oci")):
        r = _reprobuild(store, "build", "-C", str(d), "--locked", "--offline", "-f", fmt, "-o", str(out), "-q")
        assert r.returncode == 0, r.stderr[-3000:]
    return {"definition": d, "store": store, "tar": work / "out-tar/image.tar", "dir": work / "out-dir/image",
            "oci": work / "out-oci/image.oci.tar"}


def test_manifest_lists_what_reprobuild_wrote_and_why(built: dict[str, Path]) -> None:
    manifest = json.loads(built["tar"].with_name("image.tar.manifest.json").read_text())
    validate_manifest(manifest)
    added = {(a["path"], a["action"]): a["cause"] for a in manifest["added_files"]}
    assert added[("/etc/hostname", "written")] == "Hostname=fixture"
    assert added[("/etc/app/app.conf", "written")] == added[("/etc/app/link", "written")] == "ExtraTrees=extra"
    for unit in ("getty@.service.d", "serial-getty@.service.d", "console-getty.service.d"):
        assert added[(f"/etc/systemd/system/{unit}/autologin.conf", "written")] == "Autologin=yes"
    assert added[("/etc/machine-id", "written")] == "MachineId=0123456789abcdef0123456789abcdef"
    assert added[("/usr/bin/sleep", "removed")] == "RemoveFiles=/usr/bin/sleep"
    assert added[("/etc/fstab", "written")].startswith("package installation: a placeholder")
    assert added[("/var/lib/systemd/random-seed", "written")] == "ExtraTrees=extra"
    assert added[("/var/lib/systemd/random-seed", "removed")].startswith("normalisation: random bytes")
    directory = json.loads(built["dir"].with_name("image.manifest.json").read_text())
    assert directory["added_files"] == manifest["added_files"]  # the same list whatever the format


def _audit(built: dict[str, Path], image: Path, *extra: str, path: str | None = None) -> dict:
    r = _reprobuild(built["store"], "verify", "--audit", str(image), "--lock", str(built["definition"] / "reprobuild.lock"),
                    "--json", *extra, path=path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_audit_names_files_from_no_package_with_their_cause(built: dict[str, Path]) -> None:
    report = _audit(built, built["tar"])
    assert report["packages"] == 1 and report["package_files"] > 20
    unowned = {f["path"]: f["detail"] for f in report["not_from_packages"]}
    assert unowned["/etc/hostname"] == "Hostname=fixture (written)"
    assert unowned["/etc/app/app.conf"] == "ExtraTrees=extra (written)"
    assert unowned["/etc/leaked-build-path"] == UNEXPLAINED  # the post-installation script's doing
    assert unowned["/var/lib/dpkg/status"].startswith("package installation: dpkg's database, started empty")
    assert unowned["/var/lib/dpkg/info/hostbase.list"] == DPKG_DATABASE
    assert "/usr/bin/cat" not in unowned and "/bin/cat" not in unowned  # merged /usr resolved
    missing = {f["path"]: f["detail"] for f in report["missing"]}
    assert missing == {"/usr/bin/sleep": "from hostbase: RemoveFiles=/usr/bin/sleep"}
    assert report["changed"] == []


def test_audit_finds_a_changed_package_file(built: dict[str, Path], tmp_path: Path) -> None:
    tree = built["dir"]
    target, removed = tree / "usr/bin/true", tree / "usr/bin/false"
    original, removed_bytes, removed_stat = target.read_bytes(), removed.read_bytes(), removed.stat()
    try:
        target.write_bytes(original + b"\0surprise")
        os.unlink(removed)
        report = _audit(built, tree)
    finally:  # the tree is the module's: put it back as it was
        target.write_bytes(original)
        removed.write_bytes(removed_bytes)
        os.chmod(removed, removed_stat.st_mode & 0o7777)
        os.utime(removed, ns=(removed_stat.st_atime_ns, removed_stat.st_mtime_ns))
    changed = {f["path"]: f["detail"] for f in report["changed"]}
    assert list(changed) == ["/usr/bin/true"] and changed["/usr/bin/true"].startswith("content differs from hostbase")
    missing = {f["path"]: f["detail"] for f in report["missing"]}
    assert missing["/usr/bin/false"] == "from hostbase: not in the image, and the manifest records no removal"


def test_audit_text_and_errors(built: dict[str, Path], tmp_path: Path) -> None:
    lock = str(built["definition"] / "reprobuild.lock")
    r = _reprobuild(built["store"], "verify", "--audit", str(built["tar"]), "--lock", lock)
    assert r.returncode == 0, r.stderr
    assert "not from any package" in r.stdout and "/etc/leaked-build-path" in r.stdout
    assert "files of dpkg's database (written by dpkg) under /var/lib/dpkg" in r.stdout
    r = _reprobuild(tmp_path / "empty-store", "verify", "--audit", str(built["tar"]), "--lock", lock)
    assert r.returncode == 1 and "not in the store" in r.stderr and "reprobuild fetch" in r.stderr
    junk = tmp_path / "junk.raw"
    junk.write_bytes(b"x" * 4096)
    r = _reprobuild(built["store"], "verify", "--audit", str(junk), "--lock", lock)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "not a Discoverable Disk Image" in r.stderr


def _findings(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("image", "read")}


@pytest.mark.parametrize("fs", ["erofs", "squashfs", "ext4"])
def test_audit_reads_a_ddi_root_in_place(built: dict[str, Path], tmp_path: Path, fs: str) -> None:
    """The directory image as a signed DDI's root, audited with no file-system tool on PATH: read
    in place (an extraction would say so in "read"), with the directory's very findings."""
    from tests.test_diff_support import make_ddi

    ddi = make_ddi(tmp_path, "img", fs=fs, tree=built["dir"], esp=False)
    empty = tmp_path / "no-tools"
    empty.mkdir()
    manifest = built["dir"].with_name("image.manifest.json")
    report = _audit(built, ddi, "--manifest", str(manifest), path=str(empty))
    assert report["read"] == f"{fs} root file system, read in place"
    as_directory = _audit(built, built["dir"])
    assert as_directory["read"] == "a directory"
    assert _findings(report) == _findings(as_directory)
    assert report["image_files"] > 20 and report["missing"] and report["not_from_packages"]
    tar = _audit(built, built["tar"])
    assert tar["read"] == "a tar, read member by member" and _findings(tar) == _findings(as_directory)


def test_audit_extracts_what_the_reader_refuses_and_says_so(built: dict[str, Path], tmp_path: Path) -> None:
    """An lz4-compressed erofs root (the reader refuses compression): fsck.erofs extracts it, the
    report says so, and the findings are the same."""
    from tests.test_diff_support import EPOCH, make_ddi

    root = tmp_path / "root.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", "-zlz4", f"-T{EPOCH}", str(root), str(built["dir"])], check=True)
    size = root.stat().st_size
    os.truncate(root, -(-size // 4096) * 4096)
    ddi = make_ddi(tmp_path, "lz4", root_fs=root, esp=False)
    manifest = built["dir"].with_name("image.manifest.json")
    report = _audit(built, ddi, "--manifest", str(manifest))
    assert report["read"].startswith("erofs root file system, ") and "extracted with fsck.erofs instead" in report["read"]
    assert _findings(report) == _findings(_audit(built, built["dir"]))


def test_audit_of_a_corrupt_ddi_root_is_one_clear_line(built: dict[str, Path], tmp_path: Path) -> None:
    from reprobuild.image.gpt import read_gpt_path
    from tests.test_diff_support import make_ddi

    ddi = make_ddi(tmp_path, "img", fs="squashfs", tree=built["dir"], esp=False)
    disk = read_gpt_path(ddi)
    root = next(p for p in disk.partitions if p.name == "root-x86-64")
    with open(ddi, "r+b") as f:
        f.seek(root.offset(disk.sector_size) + 40)  # squashfs superblock: bytes used, the table starts
        f.write(b"\xff" * 48)
    r = _reprobuild(built["store"], "verify", "--audit", str(ddi), "--lock", str(built["definition"] / "reprobuild.lock"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"error: {ddi}: squashfs: the superblock says"), r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2, r.stderr


def _tar(path: Path, members: list[tuple[str, bytes | str | None, str]]) -> Path:
    """A tar of (name, bytes for a file / target for a link / None for a directory, type)."""
    import io
    import tarfile

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data, kind in members:
            ti = tarfile.TarInfo(name)
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif kind in ("sym", "hard"):
                ti.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
                assert isinstance(data, str)
                ti.linkname = data
                tf.addfile(ti)
            else:
                assert isinstance(data, bytes)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return path


def test_audit_of_a_tar_hard_link_and_symlinked_directories(tmp_path: Path) -> None:
    """Pure: a tar's hard link has its target's bytes; package paths resolve through the tar's
    directory symlinks (absolute, relative, chained); a member under a symlink, or a hard link to
    nothing, is refused."""
    from reprobuild.audit import AuditError, AuditReport, PathResolver, Shipped, audit_tree, image_tree
    from reprobuild.diff.open import TarTree
    from reprobuild.diff.source import ByteSource

    body = b"#!/bin/sh\n"
    digest = __import__("hashlib").sha256(body).hexdigest()
    tar = _tar(tmp_path / "t.tar", [("./usr", None, "dir"), ("./usr/bin", None, "dir"), ("./usr/bin/sh", body, "file"),
                                    ("./usr/bin/dash", "./usr/bin/sh", "hard"), ("./bin", "usr/bin", "sym"),
                                    ("./usr/sbin", "/bin", "sym"), ("./sbin", "usr/sbin/../sbin", "sym")])  # fmt: skip
    with image_tree(tar) as opened:
        metas = {n: opened.tree.meta(n) for n in opened.tree.member_names()}
        resolver = PathResolver(metas)
        assert resolver.canonical(["bin", "dash"]) == "usr/bin/dash"
        assert resolver.canonical(["usr", "sbin", "x"]) == "usr/bin/x"  # /bin → usr/bin, from the root
        assert resolver.canonical(["sbin", "x"]) == "usr/bin/x"  # usr/sbin/../sbin = usr/bin/../sbin → ... → usr/bin
        assert resolver.canonical(["nowhere", "x"]) == "nowhere/x"
        shipped = {resolver.canonical(["bin", "dash"]): Shipped("dash", "file", digest),
                   resolver.canonical(["bin", "sh"]): Shipped("dash", "symlink", "dash")}  # fmt: skip
        report = AuditReport("t.tar")
        audit_tree(opened.tree, metas, resolver, shipped, {}, report)
    assert [f.path for f in report.changed] == ["/usr/bin/sh"] and "a file in the image, a symlink" in report.changed[0].detail
    assert report.missing == [] and {f.path for f in report.not_from_packages} == {"/bin", "/sbin", "/usr/sbin"}

    loop = _tar(tmp_path / "loop.tar", [("a", "b", "sym"), ("b", "a", "sym")])
    with image_tree(loop) as opened:
        metas = {n: opened.tree.meta(n) for n in opened.tree.member_names()}
        assert PathResolver(metas).canonical(["a", "f"]) == "a/f"

    for members, message in (([("bin", "usr/bin", "sym"), ("usr/bin/x", b"", "file"), ("bin/x", b"1", "file")],
                               "bin/x lies under a symbolic link"),
                              ([("x", "missing", "hard")], "x is a hard link to 'missing'")):  # fmt: skip
        bad = _tar(tmp_path / "bad.tar", members)
        tree = TarTree(ByteSource.of_file(bad))
        metas = {n: tree.meta(n) for n in tree.member_names()}
        with pytest.raises(AuditError, match=message):
            audit_tree(tree, metas, PathResolver(metas), {"x": Shipped("p", "file", digest)}, {}, AuditReport("bad.tar"))


def test_audit_needs_no_user_namespace(built: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """An ordinary user without subordinate ids audits too: nothing is extracted or owned."""
    from reprobuild import userns
    from reprobuild.cli import main

    def unavailable() -> None:
        raise userns.RootlessUnavailable("no subordinate ids for this user")

    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    monkeypatch.setattr(userns, "plan", unavailable)
    monkeypatch.setenv("REPROBUILD_STORE", str(built["store"]))

    def status(*args: str) -> int | str | None:
        try:
            main(list(args))
        except SystemExit as e:
            return e.code
        return 0

    lock = str(built["definition"] / "reprobuild.lock")
    code = status("verify", "--audit", str(built["tar"]), "--lock", lock, "--json")
    out = capsys.readouterr()
    assert code == 0, out.err
    assert json.loads(out.out)["read"] == "a tar, read member by member"
    code = status("verify", str(built["tar"]), "--lock", lock)  # a rebuild still needs the namespace, and says why
    assert code != 0 and "no subordinate ids" in capsys.readouterr().err


def test_audit_of_an_oci_image_reads_its_layer(built: dict[str, Path], tmp_path: Path) -> None:
    """``-f oci``: the layer is the root tree; the findings are the tar output's. A layer that
    decompresses beyond its bound, one cut short, or an archive without one, is one clear line."""
    import io
    import tarfile

    from reprobuild.errors import FormatError
    from reprobuild.rootfs.oci import decompress_layer

    report = _audit(built, built["oci"])
    assert report["read"] == "an OCI image's layer, read member by member"
    assert _findings(report) == _findings(_audit(built, built["tar"]))
    with pytest.raises(FormatError, match="decompresses to more than 4096 bytes"):
        decompress_layer(built["oci"], tmp_path / "layer.tar", 4096)
    # A layer cut short: the gzip stream ends early.
    cut = tmp_path / "cut.oci.tar"
    with tarfile.open(built["oci"]) as src, tarfile.open(cut, "w", format=tarfile.USTAR_FORMAT) as dst:
        index = json.loads(src.extractfile("index.json").read())  # type: ignore[union-attr]
        manifest = json.loads(src.extractfile("blobs/sha256/" + index["manifests"][0]["digest"][7:]).read())  # type: ignore[union-attr]
        layer_name = "blobs/sha256/" + manifest["layers"][0]["digest"][7:]
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isfile() else None  # type: ignore[union-attr]
            if m.name == layer_name and data is not None:
                data = data[: len(data) // 2]
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
    with pytest.raises(FormatError, match="truncated|not a readable OCI image"):
        decompress_layer(cut, tmp_path / "layer.tar", 1 << 30)
    r = _reprobuild(built["store"], "verify", "--audit", str(cut), "--lock", str(built["definition"] / "reprobuild.lock"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "cut.oci.tar" in r.stderr, r.stderr
    # index.json and oci-layout but no such blob: not an OCI image it can read
    broken = tmp_path / "broken.oci.tar"
    with tarfile.open(broken, "w") as dst:
        for name, data in (("index.json", b'{"manifests": []}'), ("oci-layout", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    r = _reprobuild(built["store"], "verify", "--audit", str(broken), "--lock", str(built["definition"] / "reprobuild.lock"))
    assert r.returncode == 1 and "not a readable OCI image" in r.stderr and "Traceback" not in r.stderr, r.stderr
