"""``build -f oci``, hermetic: the one-package fixture definition (tests/check_fixture.py) built as an
OCI image (oci-archive) through the real command line.

* a cached and a ``--no-cache`` build are byte-identical;
* the layout is valid: oci-layout, index → manifest → config and layer, every digest and size
  and mediaType as the image spec says; the config's diff_id is the digest of the uncompressed
  layer, which is byte for byte the ``-f tar`` output;
* Debian's skopeo accepts it, and Debian's umoci unpacks it into the same tree as the tar output
  (names, types, modes, owners, mtimes, link targets, content digests);
* ``verify --no-rebuild`` checks its digest against the manifest (and notices one flipped bit)
  and reads dpkg's status from inside the layer; a malformed archive is a FormatError, not a
  traceback.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fixtures.make_host_base import build_host_base
from reprobuild.errors import BuildError, FormatError
from reprobuild.lockfile import load_lock, lock_digest
from reprobuild.rootfs.archive import write_tar_stream
from reprobuild.rootfs.oci import (
    MEDIA_CONFIG,
    MEDIA_INDEX,
    MEDIA_LAYER_GZIP,
    MEDIA_MANIFEST,
    platform,
    read_layer_file,
    rfc3339,
    write_layer,
)
from tests.check_fixture import EPOCH, make_definition

REPO = Path(__file__).resolve().parent.parent
needs_tools = pytest.mark.skipif(shutil.which("skopeo") is None or shutil.which("umoci") is None,
                                 reason="skopeo and umoci are not installed (make apt installs them)")


def _cli(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REPROBUILD_STORE": str(store)}
    env.pop("SOURCE_DATE_EPOCH", None)
    return subprocess.run([sys.executable, "-m", "reprobuild", *args], env=env, text=True, capture_output=True,
                          timeout=300, cwd=REPO, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("oci")
    d = make_definition(root, "http://127.0.0.1:9/unused", leak=False, base_deb=build_host_base(root / "base"))
    store = root / "store"
    out = {"definition": d, "store": store}
    for name, extra in (("oci", ("-f", "oci")), ("oci-nocache", ("-f", "oci", "--no-cache")), ("tar", ("-f", "tar"))):
        r = _cli(store, "build", "-C", str(d), "--locked", "--offline", "-o", str(root / name), *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = root / name
    return out


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layout(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        assert all(m.uid == 0 and m.gid == 0 and m.mtime == EPOCH for m in members)
        return {m.name: tf.extractfile(m).read() for m in members if m.isfile()}  # type: ignore[union-attr]


def test_layer_is_one_gzip_member_of_the_deterministic_tar(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("x\n")
    os.symlink("hostname", tree / "etc/link")
    layer = io.BytesIO()
    digests = write_layer(tree, layer, EPOCH)
    plain = io.BytesIO()
    write_tar_stream(tree, plain, EPOCH)
    blob = layer.getvalue()
    assert blob[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # no name, MTIME 0, XFL 0, OS 255
    assert gzip.decompress(blob) == plain.getvalue()
    assert digests.digest == _sha(blob) and digests.size == len(blob) and digests.diff_id == _sha(plain.getvalue())
    again = io.BytesIO()
    write_layer(tree, again, EPOCH)
    assert again.getvalue() == blob


def test_cached_and_uncached_builds_are_byte_identical(built: dict[str, Path]) -> None:
    a, b = (built[n] / "image.oci.tar" for n in ("oci", "oci-nocache"))
    assert a.read_bytes() == b.read_bytes()
    manifest = json.loads((built["oci"] / "image.oci.tar.manifest.json").read_text())
    assert manifest["format"] == "oci" and manifest["sha256"] == _sha(a.read_bytes())[7:]
    assert manifest["size"] == a.stat().st_size
    import jsonschema

    jsonschema.validate(manifest, json.loads((REPO / "reprobuild/manifest.schema.json").read_text()))


def test_layout_validates_and_its_layer_is_the_tar_output(built: dict[str, Path]) -> None:
    files = _layout(built["oci"] / "image.oci.tar")
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    blobs = {"sha256:" + name.rsplit("/", 1)[1]: data for name, data in files.items() if name.startswith("blobs/")}
    assert all(_sha(data) == digest for digest, data in blobs.items())  # content-addressed
    assert set(files) == {"oci-layout", "index.json", *("blobs/sha256/" + d[7:] for d in blobs)}

    index = json.loads(files["index.json"])
    assert index["schemaVersion"] == 2 and index["mediaType"] == MEDIA_INDEX
    [desc] = index["manifests"]
    assert desc["mediaType"] == MEDIA_MANIFEST and desc["size"] == len(blobs[desc["digest"]])
    assert desc["platform"] == {"architecture": "amd64", "os": "linux"}
    lock = load_lock(built["definition"] / "reprobuild.lock")
    assert desc["annotations"]["org.opencontainers.image.ref.name"] == f"trixie-{EPOCH}"

    manifest = json.loads(blobs[desc["digest"]])
    assert manifest["schemaVersion"] == 2 and manifest["mediaType"] == MEDIA_MANIFEST
    annotations = manifest["annotations"]
    assert annotations["org.opencontainers.image.revision"] == lock_digest(lock)
    assert annotations["org.opencontainers.image.created"] == rfc3339(EPOCH) == "2025-01-01T00:00:00Z"
    config_desc, [layer_desc] = manifest["config"], manifest["layers"]
    assert config_desc["mediaType"] == MEDIA_CONFIG and config_desc["size"] == len(blobs[config_desc["digest"]])
    assert layer_desc["mediaType"] == MEDIA_LAYER_GZIP and layer_desc["size"] == len(blobs[layer_desc["digest"]])
    assert len(blobs) == 3

    config = json.loads(blobs[config_desc["digest"]])
    assert (config["architecture"], config["os"], config["created"]) == ("amd64", "linux", "2025-01-01T00:00:00Z")
    layer_tar = gzip.decompress(blobs[layer_desc["digest"]])
    assert config["rootfs"] == {"type": "layers", "diff_ids": [_sha(layer_tar)]}
    assert layer_tar == (built["tar"] / "image.tar").read_bytes()  # the same deterministic tar as -f tar

    recorded = json.loads((built["oci"] / "image.oci.tar.manifest.json").read_text())["oci"]
    assert recorded["manifest_digest"] == desc["digest"] and recorded["layer_digest"] == layer_desc["digest"]
    assert recorded["diff_id"] == config["rootfs"]["diff_ids"][0]


def _tree_of_tar(archive: Path) -> dict[str, tuple]:
    out = {}
    with tarfile.open(archive) as tf:
        for m in tf.getmembers():
            name = m.name.removeprefix("./").rstrip("/")
            if name in ("", "."):  # the root itself
                continue
            data = tf.extractfile(m).read() if m.isfile() else b""  # type: ignore[union-attr]
            kind = "dir" if m.isdir() else "link" if m.issym() else "hard" if m.islnk() else "file"
            if kind == "hard":  # the unpacked tree has the content under both names
                kind, data = "file", tf.extractfile(tf.getmember(m.linkname)).read()  # type: ignore[union-attr]
            out[name] = (kind, m.mode & 0o7777, m.uid, m.gid, m.mtime, m.linkname if kind == "link" else "",
                         hashlib.sha256(data).hexdigest())  # fmt: skip
    return out


def _tree_of_dir(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "link" if stat.S_ISLNK(st.st_mode) else "file"
            data = p.read_bytes() if kind == "file" else b""
            out[p.relative_to(root).as_posix()] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                                                   int(st.st_mtime), os.readlink(p) if kind == "link" else "",
                                                   hashlib.sha256(data).hexdigest())  # fmt: skip
    return out


@needs_tools
def test_skopeo_and_umoci_accept_it_and_unpack_the_tar_outputs_tree(built: dict[str, Path], tmp_path: Path) -> None:
    archive = built["oci"] / "image.oci.tar"
    r = subprocess.run(["skopeo", "inspect", f"oci-archive:{archive}"], capture_output=True, text=True, timeout=120,
                       check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    recorded = json.loads((built["oci"] / "image.oci.tar.manifest.json").read_text())["oci"]
    assert info["Digest"] == recorded["manifest_digest"]
    assert (info["Architecture"], info["Os"], info["Created"]) == ("amd64", "linux", "2025-01-01T00:00:00Z")

    layout = tmp_path / "layout"
    layout.mkdir()
    with tarfile.open(archive) as tf:
        tf.extractall(layout, filter="data")
    rootless = ["--rootless"] if os.geteuid() != 0 else []  # rootless umoci cannot restore owners
    r = subprocess.run(["umoci", "unpack", *rootless, "--image", f"{layout}:{recorded['tag']}", str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    unpacked, expected = _tree_of_dir(tmp_path / "b/rootfs"), _tree_of_tar(built["tar"] / "image.tar")
    if rootless:  # owners are not compared: umoci --rootless cannot restore them
        unpacked, expected = ({k: (*v[:2], 0, 0, *v[4:]) for k, v in t.items()} for t in (unpacked, expected))
    assert sorted(unpacked) == sorted(expected)
    assert [k for k in expected if unpacked[k] != expected[k]] == []

    # skopeo copies it into a plain layout without changing a blob (the same manifest digest).
    r = subprocess.run(["skopeo", "copy", "--quiet", f"oci-archive:{archive}", f"oci:{tmp_path / 'copy'}:x"],
                       capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    [copied] = json.loads((tmp_path / "copy/index.json").read_text())["manifests"]
    assert copied["digest"] == recorded["manifest_digest"]


def test_verify_checks_the_oci_outputs_digest(built: dict[str, Path], tmp_path: Path) -> None:
    out = built["oci"]
    r = _cli(built["store"], "verify", str(out / "image.oci.tar"), "--lock", str(built["definition"] / "reprobuild.lock"),
             "--no-rebuild", "--allow-unsigned", "lock", "--allow-unsigned", "provenance", "--json")  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    checks = {c["name"]: c["status"] for c in json.loads(r.stdout)["checks"]}
    assert checks["image-digest"] == "passed" and checks["installed-packages"] == "passed"
    tampered = tmp_path / "image.oci.tar"
    data = bytearray((out / "image.oci.tar").read_bytes())
    data[-20000] ^= 1
    tampered.write_bytes(bytes(data))
    shutil.copy(out / "image.oci.tar.manifest.json", tmp_path)
    r = _cli(built["store"], "verify", str(tampered), "--lock", str(built["definition"] / "reprobuild.lock"),
             "--no-rebuild", "--allow-unsigned", "lock", "--allow-unsigned", "provenance", "--json")  # fmt: skip
    assert r.returncode != 0
    assert {c["name"]: c["status"] for c in json.loads(r.stdout)["checks"]}["image-digest"] == "failed"


def test_reading_a_malformed_archive_is_a_format_error(built: dict[str, Path], tmp_path: Path) -> None:
    good = built["oci"] / "image.oci.tar"
    assert read_layer_file(good, "etc/hostname") == b"fixture\n"
    assert read_layer_file(good, "no/such/file") is None
    files = _layout(good)
    index = json.loads(files["index.json"])
    index["manifests"][0]["digest"] = "sha256:../../etc/passwd"
    cases = {"garbage": b"not a tar" * 100, "truncated": good.read_bytes()[:30000],
             "bad-digest": _ustar({**files, "index.json": json.dumps(index).encode()})}  # fmt: skip
    for name, data in cases.items():
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(FormatError):
            read_layer_file(bad, "var/lib/dpkg/status")


def _ustar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_a_new_lock_with_the_same_tree_gets_its_own_annotations(built: dict[str, Path], tmp_path: Path) -> None:
    """The cache must not serve the old image: its annotations name the old lock."""
    from dataclasses import replace

    from reprobuild.lockfile import save_lock

    d = tmp_path / "def"
    shutil.copytree(built["definition"], d)
    lock = load_lock(d / "reprobuild.lock")
    relocked = replace(lock, sources=(replace(lock.sources[0], snapshot="20250102T000000Z"),))
    save_lock(relocked, d / "reprobuild.lock")
    assert lock_digest(relocked) != lock_digest(lock)
    r = _cli(built["store"], "build", "-C", str(d), "--locked", "--offline", "-o", str(tmp_path / "out"), "-f", "oci")
    assert r.returncode == 0, r.stderr[-3000:]
    files = _layout(tmp_path / "out/image.oci.tar")
    [desc] = json.loads(files["index.json"])["manifests"]
    manifest = json.loads(files["blobs/sha256/" + desc["digest"][7:]])
    assert manifest["annotations"]["org.opencontainers.image.revision"] == lock_digest(relocked)


def test_platforms_of_debian_architectures() -> None:
    assert platform("amd64") == {"architecture": "amd64", "os": "linux"}
    assert platform("arm64") == {"architecture": "arm64", "os": "linux", "variant": "v8"}
    assert platform("armhf") == {"architecture": "arm", "os": "linux", "variant": "v7"}
    assert platform("ppc64el")["architecture"] == "ppc64le" and platform("i386")["architecture"] == "386"
    with pytest.raises(BuildError, match="no OCI platform"):
        platform("hurd-i386")


def test_diff_compares_oci_images_by_documents_and_layer_tree(built: dict[str, Path], tmp_path: Path) -> None:
    """``reprobuild diff`` of two OCI images names the file that differs inside the layer and the
    config fields, not blobs named by digest; an OCI image against the tar output is a tree diff."""
    from dataclasses import replace

    from reprobuild.config import load_spec
    from reprobuild.diff.compare import compare_paths
    from reprobuild.diff.difference import METADATA, Field, leaves
    from reprobuild.lockfile import save_lock

    other = tmp_path / "other"
    shutil.copytree(built["definition"], other, ignore=shutil.ignore_patterns("store"))
    conf = (other / "reprobuild.conf").read_text()
    (other / "reprobuild.conf").write_text(conf.replace("Hostname=fixture", "Hostname=elsewhere"))
    spec = load_spec(other)
    save_lock(replace(load_lock(other / "reprobuild.lock"), config_digest=spec.digest(), config=spec.digest_input()),
              other / "reprobuild.lock")
    r = _cli(built["store"], "build", "-C", str(other), "--locked", "--offline", "-o", str(tmp_path / "out"), "-f", "oci")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = built["oci"] / "image.oci.tar", tmp_path / "out/image.oci.tar"
    result = compare_paths(a, b)
    assert result.difference is not None and result.difference.kind == "oci"
    paths = {" / ".join(p): n for p, n in leaves(result.difference)}
    assert "layer.tar / etc/hostname" in paths, sorted(paths)
    assert not any("blobs/sha256" in p for p in paths), sorted(paths)
    assert any(p.startswith(("config.json", "manifest.json")) for p in paths), sorted(paths)  # digests and labels
    assert compare_paths(a, built["oci-nocache"] / "image.oci.tar").identical
    # An OCI image against the tar output of the same definition: the same files, another format.
    against_tar = compare_paths(a, built["tar"] / "image.tar").difference
    assert against_tar is not None and not against_tar.details
    assert against_tar.fields == (Field("format", "oci", "tar", METADATA),), against_tar
    r = _cli(built["store"], "diff", str(a), str(b))
    assert r.returncode == 1 and "etc/hostname" in r.stdout and "Traceback" not in r.stderr, r.stdout + r.stderr


def test_a_tar_that_only_looks_like_an_oci_image_is_compared_as_a_tar(tmp_path: Path) -> None:
    """``is_oci_archive`` guesses from the first header: a tar starting with ``blobs/`` but holding
    no image layout is still diffed, as the plain tar it is, with the reason."""
    from reprobuild.diff.compare import compare_paths
    from reprobuild.diff.detect import Kind, detect
    from reprobuild.diff.difference import leaves
    from reprobuild.diff.source import ByteSource

    paths = []
    for name, text in (("a.tar", b"one\n"), ("b.tar", b"two\n")):
        path = tmp_path / name
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for member, data in (("blobs/", None), ("blobs/notes.txt", text)):
                info = tarfile.TarInfo(member)
                if data is None:
                    info.type = tarfile.DIRTYPE
                else:
                    info.size = len(data)
                tf.addfile(info, io.BytesIO(data) if data is not None else None)
        paths.append(path)
    assert detect(ByteSource.of_file(paths[0])) is Kind.OCI
    result = compare_paths(paths[0], paths[1])
    assert result.difference is not None
    found = {" / ".join(p): n for p, n in leaves(result.difference)}
    assert "blobs/notes.txt" in found, found
    assert any("compared as plain tar archives" in c for c in result.difference.comments), result.difference
