"""Safe extraction: hostile tar members must never write outside the tree."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from reprobuild.errors import FormatError
from reprobuild.rootfs.unpack import TreeWriter, UnsafePath, extract_tar, split_member_name


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> tarfile.TarFile:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            if data is not None:
                ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return tarfile.open(fileobj=buf, mode="r|")


def _ti(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", mode: int = 0o644, **kw: object) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode, ti.mtime = kind, linkname, mode, 1000
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    t = tmp_path / "tree"
    t.mkdir()
    return t


@pytest.mark.parametrize("name", ["../evil", "./a/../../evil", "/etc/evil", "a/b/../../../evil"],
                         ids=["dotdot", "nested-dotdot", "absolute", "deep-dotdot"])
def test_bad_names_rejected(tree: Path, name: str) -> None:
    with pytest.raises(UnsafePath):
        extract_tar(_tar([(_ti(name), b"x")]), TreeWriter(tree), "evil-pkg")
    assert not (tree.parent / "evil").exists()


def test_absolute_symlink_is_resolved_inside_the_tree(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    # "esc" points at the host directory by absolute path, then a file is written through it.
    members = [(_ti("./esc", tarfile.SYMTYPE, str(outside)), None), (_ti("./esc/pwned"), b"gotcha")]
    extract_tar(_tar(members), TreeWriter(tree), "evil-pkg")
    assert not (outside / "pwned").exists()
    assert (tree / str(outside).lstrip("/") / "pwned").read_bytes() == b"gotcha"
    assert os.readlink(tree / "esc") == str(outside)  # the link itself is kept verbatim


def test_relative_symlink_climbing_out_is_clamped_at_the_root(tree: Path, tmp_path: Path) -> None:
    members = [(_ti("./a/up", tarfile.SYMTYPE, "../../../../../.."), None), (_ti("./a/up/pwned"), b"x")]
    extract_tar(_tar(members), TreeWriter(tree), "evil-pkg")
    assert not (tmp_path / "pwned").exists()
    assert (tree / "pwned").exists()


def test_file_over_existing_symlink_replaces_the_link(tree: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    members = [(_ti("./f", tarfile.SYMTYPE, str(victim)), None), (_ti("./f"), b"overwritten")]
    extract_tar(_tar(members), TreeWriter(tree), "evil-pkg")
    assert victim.read_text() == "precious"
    assert (tree / "f").read_bytes() == b"overwritten" and not (tree / "f").is_symlink()


def test_a_replaced_symlink_is_followed_anew(tree: Path) -> None:
    """The writer remembers each entry's parent directory; replacing a symlink on the way must
    make the next entry resolve through the new link, as an extractor without memory would."""
    members = [(_ti("./d1", tarfile.DIRTYPE, mode=0o755), None), (_ti("./d2", tarfile.DIRTYPE, mode=0o755), None),
               (_ti("./l", tarfile.SYMTYPE, "d1"), None), (_ti("./l/f"), b"first"),
               (_ti("./l", tarfile.SYMTYPE, "/d2"), None), (_ti("./l/g"), b"second")]
    extract_tar(_tar(members), TreeWriter(tree), "pkg")
    assert (tree / "d1/f").read_bytes() == b"first" and not (tree / "d1/g").exists()
    assert (tree / "d2/g").read_bytes() == b"second"


def test_a_symlink_replaced_by_a_file_is_no_longer_a_directory(tree: Path) -> None:
    """After a regular file takes a symlink's place, an entry below that name must fail as it
    would in an extractor without memory, not land where the old link pointed."""
    members = [(_ti("./d", tarfile.DIRTYPE, mode=0o755), None), (_ti("./l", tarfile.SYMTYPE, "d"), None),
               (_ti("./l/f"), b"first"), (_ti("./l"), b"a file now"), (_ti("./l/g"), b"second")]
    with pytest.raises(FormatError, match="(?i)not a directory"):
        extract_tar(_tar(members), TreeWriter(tree), "pkg")
    assert (tree / "d/f").read_bytes() == b"first" and not (tree / "d/g").exists()
    assert (tree / "l").read_bytes() == b"a file now"


def test_a_directory_replaced_by_a_symlink_is_followed_anew(tree: Path) -> None:
    """An empty directory may become a symlink; entries after it go where the link points, in the
    tree (an absolute target: the host's kernel must never be the one to follow it)."""
    members = [(_ti("./a", tarfile.DIRTYPE, mode=0o755), None), (_ti("./a/sub", tarfile.DIRTYPE, mode=0o755), None),
               (_ti("./t", tarfile.DIRTYPE, mode=0o755), None), (_ti("./t/sub", tarfile.DIRTYPE, mode=0o755), None),
               (_ti("./a/sub/x"), b"x")]
    writer = TreeWriter(tree)
    extract_tar(_tar(members), writer, "pkg")
    (tree / "a/sub/x").unlink()  # (as if by an earlier package's removal) a/sub is empty again
    extract_tar(_tar([(_ti("./a/sub", tarfile.SYMTYPE, "/t/sub"), None), (_ti("./a/sub/y"), b"y")]), writer, "pkg")
    assert (tree / "t/sub/y").read_bytes() == b"y" and (tree / "a/sub").is_symlink()


def test_hard_link_to_outside_is_rejected(tree: Path) -> None:
    with pytest.raises(UnsafePath):
        extract_tar(_tar([(_ti("./h", tarfile.LNKTYPE, "../../etc/passwd"), None)]), TreeWriter(tree), "p")
    with pytest.raises(FormatError):  # target missing in the tree
        extract_tar(_tar([(_ti("./h", tarfile.LNKTYPE, "./etc/passwd"), None)]), TreeWriter(tree), "p")


def test_hard_link_through_symlink_stays_inside(tree: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s")
    members = [(_ti("./d", tarfile.SYMTYPE, str(tmp_path)), None), (_ti("./h", tarfile.LNKTYPE, "./d/secret"), None)]
    with pytest.raises(FormatError):  # resolves to <tree>/<tmp_path>/secret, which does not exist
        extract_tar(_tar(members), TreeWriter(tree), "p")
    assert os.stat(secret).st_nlink == 1


def test_device_nodes_rejected(tree: Path) -> None:
    ti = _ti("./dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0)
    with pytest.raises(UnsafePath, match="Policy"):
        extract_tar(_tar([(ti, None)]), TreeWriter(tree), "evil-pkg")
    assert not (tree / "dev/sda").exists()


def test_merged_usr_directory_symlink_is_kept(tree: Path) -> None:
    """tar --keep-directory-symlink: ./bin/ as a directory entry does not replace bin -> usr/bin."""
    members = [(_ti("./usr/bin/", tarfile.DIRTYPE, mode=0o755), None), (_ti("./bin", tarfile.SYMTYPE, "usr/bin"), None),
               (_ti("./bin/", tarfile.DIRTYPE, mode=0o755), None), (_ti("./bin/sh", mode=0o755), b"#!")]
    w = TreeWriter(tree)
    extract_tar(_tar(members), w, "p")
    w.finish()
    assert os.readlink(tree / "bin") == "usr/bin"
    assert (tree / "usr/bin/sh").read_bytes() == b"#!"


def test_metadata_and_xattrs_kept(tree: Path) -> None:
    cap = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    ti = _ti("./usr/bin/ping", mode=0o4755, uid=0, gid=0)
    ti.pax_headers = {"SCHILY.xattr.user.test": cap.decode("utf-8", "surrogateescape")}
    d = _ti("./usr/bin/", tarfile.DIRTYPE, mode=0o750)
    w = TreeWriter(tree)
    extract_tar(_tar([(d, None), (ti, b"ELF")]), w, "iputils-ping")
    w.finish()
    st = os.stat(tree / "usr/bin/ping")
    assert oct(st.st_mode & 0o7777) == oct(0o4755)
    assert int(st.st_mtime) == 1000 and int(os.stat(tree / "usr/bin").st_mtime) == 1000
    assert oct(os.stat(tree / "usr/bin").st_mode & 0o7777) == oct(0o750)
    assert os.getxattr(tree / "usr/bin/ping", "user.test") == cap


def test_split_member_name() -> None:
    assert split_member_name("./usr//bin/x") == ["usr", "bin", "x"]
    assert split_member_name("./") == []


def _skip_docs(parts: list[str]) -> bool:
    return parts[:2] == ["usr", "doc"]


def test_skip_leaves_out_files_but_creates_directories(tree: Path) -> None:
    members = [(_ti("./usr/doc/p", tarfile.DIRTYPE, mode=0o750), None), (_ti("./usr/doc/p/README"), b"r"),
               (_ti("./usr/doc/p/link", tarfile.SYMTYPE, "README"), None),
               (_ti("./usr/bin/tool", tarfile.LNKTYPE, "./usr/doc/p/README"), None),
               (_ti("./usr/bin/x"), b"x")]
    written = extract_tar(_tar(members), TreeWriter(tree), "p", skip=_skip_docs)
    assert written == ["/usr/doc/p", "/usr/bin/x"]
    assert (tree / "usr/doc/p").is_dir() and (tree / "usr/doc/p").stat().st_mode & 0o777 == 0o750
    assert os.listdir(tree / "usr/doc/p") == []
    assert not os.path.lexists(tree / "usr/bin/tool")  # a hard link to a skipped file is skipped too
    assert (tree / "usr/bin/x").read_bytes() == b"x"


@pytest.mark.parametrize("member", [
    _ti("./usr/doc/../../evil"), _ti("/usr/doc/evil"), _ti("./usr/doc/dev", tarfile.CHRTYPE),
    _ti("./usr/doc/h", tarfile.LNKTYPE, "../../etc/passwd"), _ti("./usr/doc/s", tarfile.SYMTYPE, ""),
], ids=["dotdot", "absolute", "device", "hardlink-dotdot", "empty-symlink"])
def test_skipped_members_are_still_checked(tree: Path, member: tarfile.TarInfo) -> None:
    with pytest.raises(UnsafePath):
        extract_tar(_tar([(member, b"x" if member.isreg() else None)]), TreeWriter(tree), "evil-pkg", skip=_skip_docs)


def test_resolve_in_tree_is_the_tree_writers_walk_without_a_disk(tree: Path) -> None:
    """The pure walk (what ``verify --audit`` resolves an image's paths with, in memory) agrees with
    TreeWriter.resolve on a real tree: absolute targets restart at the root, ``..`` stops there,
    chains are followed, a loop and a file in the middle are refused, a missing middle is not found."""
    from reprobuild.rootfs.unpack import TreeEntry, resolve_in_tree

    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/sh").write_bytes(b"")
    for name, target in (("bin", "usr/bin"), ("usr/sbin", "/bin"), ("sbin", "../../../usr/sbin"), ("up", "../.."),
                         ("a", "b"), ("b", "a"), ("file", "usr/bin/sh")):  # fmt: skip
        os.symlink(target, tree / name)

    def lookup(components: list[str]) -> TreeEntry | None:
        p = tree.joinpath(*components)
        if p.is_symlink():
            return TreeEntry("symlink", os.readlink(p))
        return TreeEntry("directory") if p.is_dir() else TreeEntry("other") if p.exists() else None

    writer = TreeWriter(tree)
    for parts, expected in (("bin/sh", "usr/bin/sh"), ("sbin/x", "usr/bin/x"), ("up/usr/sbin", "usr/bin"),
                            ("usr/sbin/../sbin", "usr/bin"), ("bin/new", "usr/bin/new")):  # fmt: skip
        assert "/".join(resolve_in_tree(parts.split("/"), lookup, follow_last=True)) == expected
        assert writer.resolve(parts.split("/"), follow_last=True) == str(tree / expected)
    assert resolve_in_tree(["bin"], lookup, follow_last=False) == ["bin"]
    for parts, error in ((["a", "x"], UnsafePath), (["file", "x"], UnsafePath), (["none", "x"], FileNotFoundError)):
        with pytest.raises(error):
            resolve_in_tree(parts, lookup, follow_last=True)
        with pytest.raises(error):
            writer.resolve(parts, follow_last=True)
    made: list[list[str]] = []
    assert resolve_in_tree(["none", "x"], lookup, follow_last=True, make_dir=made.append) == ["none", "x"]
    assert made == [["none"], ["none", "x"]]


def test_timezone_without_zoneinfo_is_a_build_error(tree: Path) -> None:
    from reprobuild.errors import BuildError
    from reprobuild.rootfs.settings import set_timezone

    with pytest.raises(BuildError, match="is not in the tree"):
        set_timezone(tree, "Europe/Berlin", 0)
    os.makedirs(tree / "usr/share")
    os.symlink("zoneinfo", tree / "usr/share/zoneinfo")  # a loop
    with pytest.raises(BuildError, match="is not in the tree"):
        set_timezone(tree, "Europe/Berlin", 0)
