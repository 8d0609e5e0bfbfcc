"""Hermetic install tests: a base made of the host's binaries + small fixture packages, no network.

Needs root (dpkg chowns, the sandbox mounts), util-linux's unshare and the host's dpkg-deb to build
the fixtures. Covers ordering, Pre-Depends, failing maintainer scripts, hostile packages, every
tree setting and bit-for-bit equal output of two builds.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from fixtures.make_host_base import build_host_base
from reprobuild.errors import BuildError, FormatError
from reprobuild.rootfs.install import MaintainerScriptFailed, layers
from reprobuild.rootfs.plan import PlannedPackage, plan_from_debs
from reprobuild.rootfs.tree import TreeSettings, build_tree, write_tar
from tests.test_deb import _ar, dpkg_deb_build

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="building a root tree needs root (dpkg, mounts)")

EPOCH = 1735689600


def _log(name: str, what: str) -> str:
    return f"#!/bin/sh\nset -e\necho '{name} {what}' >> /order.log\n"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_host_base(tmp_path_factory.mktemp("hostbase"))


DEFAULT_SETTINGS = TreeSettings()


def _build(workdir: Path, debs: list[Path], settings: TreeSettings = DEFAULT_SETTINGS, name: str = "tree") -> Path:
    plan, paths = plan_from_debs(debs)
    out = workdir / name
    build_tree(plan, paths.__getitem__, out, settings, EPOCH)
    return out


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if str(path) in line]


def test_order_pre_depends_and_status(tmp_path: Path, base: Path) -> None:
    debs = [
        base,
        dpkg_deb_build(tmp_path, "c", scripts={"preinst": _log("c", "preinst"), "postinst": _log("c", "postinst")}),
        dpkg_deb_build(tmp_path, "b", extra_fields="Pre-Depends: c\n",
                       scripts={"preinst": _log("b", "preinst"), "postinst": _log("b", "postinst")}),
        dpkg_deb_build(tmp_path, "a", extra_fields="Depends: b\n",
                       scripts={"preinst": _log("a", "preinst"), "postinst": _log("a", "postinst")},
                       files={"usr/share/a/data": b"a"}),
    ]
    tree = _build(tmp_path, debs)
    log = (tree / "order.log").read_text().splitlines()
    assert log.index("c postinst") < log.index("b preinst"), log  # Pre-Depends: configured before unpack
    assert log.index("b postinst") < log.index("a postinst"), log  # Depends: configured first
    stanzas = [dict(line.split(": ", 1) for line in st.splitlines() if ": " in line and not line[0].isspace())
               for st in (tree / "var/lib/dpkg/status").read_text().split("\n\n") if st.strip()]
    assert {s["Package"]: s["Status"] for s in stanzas} == {p: "install ok installed" for p in ("hostbase", "a", "b", "c")}
    assert (tree / "usr/share/a/data").read_bytes() == b"a"
    assert not (tree / "usr/sbin/policy-rc.d").exists()
    assert (tree / "etc/machine-id").read_bytes() == b""
    assert not (tree / "var/log/dpkg.log").exists()
    for dirpath, dirnames, filenames in os.walk(tree):
        for n in dirnames + filenames:
            assert os.lstat(os.path.join(dirpath, n)).st_mtime <= EPOCH
    assert _leftovers(tmp_path) == [] and _mounts_under(tmp_path) == []


def test_layers_respect_pre_depends() -> None:
    def p(name: str, dep: tuple[str, ...] = (), pre: tuple[str, ...] = ()) -> PlannedPackage:
        return PlannedPackage(name, "1", "all", "0" * 64, False, "optional", dep, pre)

    plan = [p("a", dep=("b",)), p("b", pre=("c",)), p("c"), p("d", dep=("e",)), p("e", dep=("d",))]
    got = [[x.name for x in layer] for layer in layers(plan, set())]
    assert got == [["c", "d", "e"], ["b", "a"]]
    with pytest.raises(BuildError, match="Pre-Depends cycle"):
        layers([p("x", pre=("y",)), p("y", pre=("x",))], set())


@pytest.mark.parametrize("script", ["postinst", "preinst"])
def test_failing_maintainer_script(tmp_path: Path, base: Path, script: str) -> None:
    debs = [base, dpkg_deb_build(tmp_path, "ok"),
            dpkg_deb_build(tmp_path, "broken", scripts={script: "#!/bin/sh\necho 'I am broken' >&2\nexit 3\n"})]
    with pytest.raises(MaintainerScriptFailed) as e:
        _build(tmp_path, debs)
    assert e.value.package == "broken" and e.value.script == script
    assert "exit status 3" in e.value.message and "broken" in e.value.message
    assert "I am broken" in (e.value.hint or "")
    assert not (tmp_path / "tree").exists()
    assert _leftovers(tmp_path) == [] and _mounts_under(tmp_path) == []


def _raw_deb(path: Path, name: str, members: list[tuple[tarfile.TarInfo, bytes | None]], essential: bool) -> Path:
    """A .deb dpkg-deb would refuse to build: hand-made ar with a hostile data.tar.gz."""
    def targz(items: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
            for ti, data in items:
                if data is not None:
                    ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data) if data is not None else None)
        return gzip.compress(buf.getvalue(), mtime=0)

    control = tarfile.TarInfo("./control")
    text = (f"Package: {name}\nVersion: 1\nArchitecture: all\nMaintainer: t <t@invalid>\n"
            f"{'Essential: yes' + chr(10) if essential else ''}Description: hostile\n").encode()
    path.write_bytes(_ar([("debian-binary", b"2.0\n"), ("control.tar.gz", targz([(control, text)])),
                          ("data.tar.gz", targz(members))]))
    return path


def _ti(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", **kw: object) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode = kind, linkname, 0o644
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


@pytest.mark.parametrize("essential", [True, False], ids=["extracted-by-us", "unpacked-by-dpkg"])
@pytest.mark.parametrize(
    "kind",
    ["dotdot", "absolute-symlink-escape", "device-node"],
)
def test_hostile_package_cannot_escape(tmp_path: Path, base: Path, kind: str, essential: bool) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    members = {
        "dotdot": [(_ti("./../../outside/pwned"), b"x")],
        "absolute-symlink-escape": [(_ti("./usr/", tarfile.DIRTYPE), None),
                                    (_ti("./usr/esc", tarfile.SYMTYPE, str(outside)), None),
                                    (_ti("./usr/esc/pwned"), b"x")],
        "device-node": [(_ti("./usr/", tarfile.DIRTYPE), None),
                        (_ti("./usr/disk", tarfile.BLKTYPE, devmajor=7, devminor=0), None)],
    }[kind]
    deb = _raw_deb(tmp_path / "evil.deb", "evil", members, essential)
    try:
        tree = _build(tmp_path, [base, deb])
    except (BuildError, FormatError) as e:
        assert "evil" in e.message or "disk" in e.message or "dpkg" in e.message, e.message
        assert not (tmp_path / "tree").exists()
    else:
        # dpkg inside the chroot resolves the absolute link inside the tree.
        assert kind == "absolute-symlink-escape" and not essential
        assert (tree / str(outside).lstrip("/") / "pwned").exists()
    assert list(outside.iterdir()) == []
    assert not (tmp_path.parent / "outside" / "pwned").exists()
    assert _leftovers(tmp_path) == [] and _mounts_under(tmp_path) == []


def test_settings_and_reproducible_output(tmp_path: Path, base: Path) -> None:
    skel = tmp_path / "skel"
    (skel / "etc").mkdir(parents=True)
    (skel / "etc/skel-file").write_text("from skeleton\n")
    extra = tmp_path / "extra"
    (extra / "usr/share/extra").mkdir(parents=True)
    (extra / "usr/share/extra/hello").write_text("extra\n")
    (extra / "usr/share/pkgfile").write_text("overridden by extra tree\n")
    script = tmp_path / "post.sh"
    script.write_text("#!/bin/sh\nset -e\necho \"$BUILDROOT $SOURCE_DATE_EPOCH $TZ $LC_ALL $(cat /proc/sys/kernel/hostname)\" > /etc/from-script\n"
                      "mkdir -p /usr/lib/python3/dist-packages/__pycache__\n: > /usr/lib/python3/dist-packages/__pycache__/m.cpython-311.pyc\n")
    script.chmod(0o755)
    debs = [
        base,
        dpkg_deb_build(tmp_path, "fakepasswd", files={
            "etc/shadow": b"root:*:1:0:99999:7:::\ndaemon:*:12345:0:99999:7:::\n",
            "usr/share/zoneinfo/Europe/Berlin": b"TZif2 fake",
            "usr/share/pkgfile": b"from package\n",
            "usr/share/doc/fakepasswd/README": b"docs\n",
        }, scripts={"postinst": "#!/bin/sh\nmkdir -p /var/lib/systemd\necho seed > /var/lib/systemd/random-seed\n"
                                "touch /var/lib/dpkg/status-old\n"
                                "mkdir -p /etc/ssl/private /etc/ssl/certs\n"
                                "echo key > /etc/ssl/private/ssl-cert-snakeoil.key\n"
                                "echo cert > /etc/ssl/certs/ssl-cert-snakeoil.pem\n"}),
    ]
    settings = TreeSettings(
        hostname="repro", root_password="secret", autologin=True, locale="C.UTF-8", timezone="Europe/Berlin",
        machine_id="uninitialized", skeleton_trees=(skel,), extra_trees=(extra,), postinst_scripts=(script,),
        remove_files=("/usr/share/doc/*",),
    )
    t1 = _build(tmp_path, debs, settings, "one")
    old = os.umask(0o077)
    try:
        t2 = _build(tmp_path, debs, settings, "two")
    finally:
        os.umask(old)
    assert (t1 / "etc/skel-file").read_text() == "from skeleton\n"
    assert (t1 / "usr/share/extra/hello").read_text() == "extra\n"
    assert (t1 / "usr/share/pkgfile").read_text() == "overridden by extra tree\n"
    assert (t1 / "etc/from-script").read_text() == f"/ {EPOCH} UTC C.UTF-8 repro\n"
    assert (t1 / "etc/hostname").read_text() == "repro\n"
    assert (t1 / "etc/machine-id").read_text() == "uninitialized\n"
    assert (t1 / "etc/locale.conf").read_text() == "LANG=C.UTF-8\n"
    assert os.readlink(t1 / "etc/localtime") == "../usr/share/zoneinfo/Europe/Berlin"
    assert (t1 / "etc/systemd/system/getty@.service.d/autologin.conf").read_text().count("--autologin root") == 1
    shadow = (t1 / "etc/shadow").read_text().splitlines()
    root = shadow[0].split(":")
    assert root[1].startswith("$6$") and root[2] == str(EPOCH // 86400)
    assert shadow[1].split(":")[2] == str(EPOCH // 86400)
    assert not (t1 / "usr/share/doc/fakepasswd").exists()
    assert not (t1 / "var/lib/systemd/random-seed").exists() and not (t1 / "var/lib/dpkg/status-old").exists()
    assert not (t1 / "usr/lib/python3/dist-packages/__pycache__").exists()
    assert not (t1 / "etc/ssl/private/ssl-cert-snakeoil.key").exists()
    assert not (t1 / "etc/ssl/certs/ssl-cert-snakeoil.pem").exists() and (t1 / "etc/ssl/certs").is_dir()
    write_tar(t1, tmp_path / "one.tar", EPOCH)
    write_tar(t2, tmp_path / "two.tar", EPOCH)
    h1, h2 = (hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("one.tar", "two.tar"))
    assert h1 == h2
    assert _mounts_under(tmp_path) == []


def test_out_must_not_exist_and_dpkg_is_required(tmp_path: Path, base: Path) -> None:
    (tmp_path / "tree").mkdir()
    with pytest.raises(BuildError, match="already exists"):
        _build(tmp_path, [base])
    plan, paths = plan_from_debs([dpkg_deb_build(tmp_path, "lonely", extra_fields="Essential: yes\n")])
    with pytest.raises(BuildError, match="no /usr/bin/dpkg"):
        build_tree(plan, paths.__getitem__, tmp_path / "t2", TreeSettings(), EPOCH)
    assert _leftovers(tmp_path) == []


def test_interrupt_leaves_nothing(tmp_path: Path, base: Path) -> None:
    plan, paths = plan_from_debs([base, dpkg_deb_build(tmp_path, "x")])

    def interrupt(message: str) -> None:
        if message.startswith("installing layer"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_tree(plan, paths.__getitem__, tmp_path / "tree", TreeSettings(), EPOCH, progress=interrupt)
    assert not (tmp_path / "tree").exists()
    assert _leftovers(tmp_path) == [] and _mounts_under(tmp_path) == []


def test_progress_in_a_log_is_a_few_lines_per_stage(tmp_path: Path, base: Path) -> None:
    """Extraction and installation report progress updates; a log reporter collapses them to a
    start and a summary line per stage, never a line per package."""
    from reprobuild.progress import PlainProgress, Update

    debs = [base] + [dpkg_deb_build(tmp_path, f"p{i}") for i in range(6)]
    plan, paths = plan_from_debs(debs)
    said: list[str] = []
    out = io.StringIO()
    log = PlainProgress(out, interval=3600)

    def both(message: str) -> None:
        said.append(message)
        log(message)

    build_tree(plan, paths.__getitem__, tmp_path / "tree", TreeSettings(), EPOCH, progress=both)
    log.close()
    stages = {m.stage for m in said if isinstance(m, Update)}
    assert {"extracting", "installing"} <= stages
    assert [m for m in said if isinstance(m, Update) and m.final]  # each stage says it is over
    lines = out.getvalue().splitlines()
    assert not any(f"p{i}" in ln for ln in lines for i in range(6)), lines
    assert [ln for ln in lines if ln.startswith("installing: ")][-1].startswith(f"installing: {len(plan)}/{len(plan)} packages")
    assert len(lines) <= 6, lines
