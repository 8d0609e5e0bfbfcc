"""`reprobuild vm`, `boot` and `shell`: nspawn argv and host checks (pure), the commands' error
paths through click, and real qemu + OVMF boots of tiny disks through the `vm` command."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from reprobuild import nspawn
from reprobuild.cli import _register_commands, cli
from reprobuild.errors import FormatError, ToolMissing, UsageError
from reprobuild.image import gpt, ids
from reprobuild.image.esp import make_esp
from reprobuild.nspawn import (
    DdiFacts,
    HostCannotRun,
    HostFacts,
    NotADdi,
    NspawnConfig,
    build_nspawn_argv,
    fs_kind,
    inspect_ddi,
    missing_requirements,
    probe_host,
    sidecar_root_hash,
)
from reprobuild.store import Store
from reprobuild.x509 import generate_rsa_key_and_certificate
from tests.test_diff_support import make_ddi, make_keys
from tests.test_vm import MARKER

_register_commands()

HASH = "ab" * 32


def run(*args: str) -> tuple[int, str]:
    """Exit status and output as `reprobuild` would give them (main turns a ReprobuildError into
    its exit code; a command's integer return value is the status)."""
    r = CliRunner().invoke(cli, list(args), standalone_mode=False, catch_exceptions=True)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        code = getattr(r.exception, "exit_code", None)
        assert code is not None, f"unexpected exception: {r.exception!r}"
        message = r.exception.format_message() if hasattr(r.exception, "format_message") else str(r.exception)
        return code, r.output + message
    return (r.return_value if isinstance(r.return_value, int) else r.exit_code), r.output


def esp_disk(path: Path, files: dict[str, bytes], with_gpt: bool = True) -> Path:
    """A GPT disk holding one ESP (FAT) with ``files``, or the bare FAT image."""
    fat = path.with_suffix(".fat")
    make_esp(files, fat, volume_id=1, epoch=1700000000)
    if not with_gpt:
        return fat
    esp_type = ids.partition_type(ids.Role.ESP).guid
    disk = gpt.layout_disk([gpt.PartitionRequest(esp_type, uuid.UUID(int=2), "esp", 0, fat.stat().st_size)],
                           uuid.UUID(int=1))  # fmt: skip
    gpt.write_image(disk, [fat], path)
    return path


@pytest.fixture(scope="module")
def ddis(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real DDIs (squashfs root, signed verity, with and without an ESP)."""
    w = tmp_path_factory.mktemp("ddis")
    keys = make_keys(w)
    return {"esp": make_ddi(w, "with-esp", keys=keys), "plain": make_ddi(w, "plain", keys=keys, esp=False)}


@pytest.fixture(scope="module")
def sb_cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, pem = generate_rsa_key_and_certificate("run test")
    path = tmp_path_factory.mktemp("cert") / "sb.crt"
    path.write_bytes(pem)
    return path


# ---- nspawn: argv (pure) ------------------------------------------------------------------------


def test_argv_boot() -> None:
    argv = build_nspawn_argv(NspawnConfig(Path("/i/image.raw"), boot=True, root_hash=HASH,
                                          options=("--bind=/srv", "systemd.unit=rescue.target")))  # fmt: skip
    assert argv == ["systemd-nspawn", "--image=/i/image.raw", "--read-only", "--volatile=state",
                    f"--root-hash={HASH}", "--boot", "--bind=/srv", "systemd.unit=rescue.target"]  # fmt: skip


def test_argv_shell() -> None:
    assert build_nspawn_argv(NspawnConfig(Path("x.raw"))) == [
        "systemd-nspawn", "--image=x.raw", "--read-only", "--volatile=state"]  # fmt: skip
    argv = build_nspawn_argv(NspawnConfig(Path("x.raw"), command=("ls", "-l", "/"), options=("-q",)))
    assert argv[-5:] == ["-q", "--", "ls", "-l", "/"] and "--boot" not in argv
    assert not any(a.startswith("--root-hash") for a in argv)


# ---- nspawn: the image --------------------------------------------------------------------------


def test_fs_kind() -> None:
    assert fs_kind(bytes(1024) + (0xE0F5E1E2).to_bytes(4, "little") + bytes(100)) == "erofs"
    assert fs_kind(b"hsqs" + bytes(2000)) == "squashfs"
    assert fs_kind(bytes(1024 + 0x38) + b"\x53\xef" + bytes(100)) == "ext4"
    assert fs_kind(bytes(4096)) is None and fs_kind(b"") is None


def test_root_hash_beside_image(tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    assert sidecar_root_hash(image) is None
    (tmp_path / "image.raw.manifest.json").write_text(json.dumps({"root_hash": "cd" * 32}))
    assert sidecar_root_hash(image) == "cd" * 32  # manifest as the fallback
    (tmp_path / "image.roothash").write_text(HASH.upper() + "\n")
    assert sidecar_root_hash(image) == HASH  # the .roothash file first, as systemd reads it
    (tmp_path / "image.roothash").write_text("not-a-hash\n")
    with pytest.raises(NotADdi, match="not a verity root hash"):
        sidecar_root_hash(image)
    (tmp_path / "image.roothash").unlink()
    (tmp_path / "image.raw.manifest.json").write_text(json.dumps({"root_hash": 5}))
    with pytest.raises(NotADdi, match="root_hash"):
        sidecar_root_hash(image)
    (tmp_path / "image.raw.manifest.json").write_text("[1, 2")
    with pytest.raises(NotADdi, match="manifest"):
        sidecar_root_hash(image)


def test_inspect_real_ddis(ddis: dict[str, Path]) -> None:
    facts = inspect_ddi(ddis["esp"])
    assert (facts.layout, facts.architecture, facts.root_fs) == ("root", ids.Architecture.AMD64, "squashfs")
    assert facts.verity and facts.verity_signature and facts.esp
    assert facts.root_hash is None or len(facts.root_hash) == 64
    plain = inspect_ddi(ddis["plain"])
    assert not plain.esp and plain.verity


def test_inspect_rejects_non_ddis(tmp_path: Path) -> None:
    junk = tmp_path / "junk.raw"
    junk.write_bytes(b"\x00" * 8192)
    with pytest.raises(NotADdi, match="not a Discoverable Disk Image"):
        inspect_ddi(junk)
    with pytest.raises(NotADdi, match="no root or /usr partition"):
        inspect_ddi(esp_disk(tmp_path / "esp.raw", {"EFI/x.txt": b"x"}))


# ---- nspawn: the host ---------------------------------------------------------------------------

RELEASE = "6.1.0-test"


def fake_root(tmp_path: Path, full: bool) -> Path:
    root = tmp_path / ("full" if full else "bare")
    for d in ("proc", "sys/module", "run/udev", "dev", f"lib/modules/{RELEASE}"):
        (root / d).mkdir(parents=True)
    fs = ["nodev\tproc", "\text4", "\tsquashfs"] + (["\tvfat", "\terofs"] if full else [])
    (root / "proc/filesystems").write_text("\n".join(fs) + "\n")
    (root / "proc/misc").write_text(" 232 kvm\n" + (" 236 device-mapper\n" if full else ""))
    if full:
        (root / "run/udev/control").touch()
        (root / "dev/loop-control").touch()
        (root / "sys/module/dm_verity").mkdir()
        (root / f"lib/modules/{RELEASE}/modules.dep").write_text("kernel/fs/fat/vfat.ko.xz: kernel/fs/fat/fat.ko.xz\n")
        (root / f"lib/modules/{RELEASE}/modules.builtin").write_text("kernel/drivers/md/dm-mod.ko\n")
    return root


def test_probe_fake_hosts(tmp_path: Path) -> None:
    full = probe_host(fake_root(tmp_path, True), RELEASE, "x86_64", euid=0)
    assert full.udev and full.loop and full.device_mapper and full.modules_known
    assert {"vfat", "dm_mod", "dm_verity"} <= full.modules and full.has_filesystem("erofs")
    assert full.architecture is ids.Architecture.AMD64
    bare = probe_host(fake_root(tmp_path, False), RELEASE, "riscv64", euid=1000)
    assert not (bare.udev or bare.loop or bare.device_mapper or bare.modules_known)
    assert bare.has_filesystem("squashfs") and not bare.has_filesystem("vfat") and bare.architecture is None


def test_probe_this_host() -> None:
    facts = probe_host()
    assert "proc" in facts.filesystems and facts.euid >= 0
    assert facts.udev == Path("/run/udev/control").exists()


FACTS = DdiFacts(Path("/i/image.raw"), "root", ids.Architecture.AMD64, "erofs", verity=True, verity_signature=False,
                 esp=True, root_hash=HASH)  # fmt: skip
GOOD_HOST = HostFacts(0, ids.Architecture.AMD64, True, True, True, frozenset({"erofs", "vfat"}),
                      frozenset({"dm_verity"}), True)  # fmt: skip


def test_requirements_met() -> None:
    assert missing_requirements(FACTS, GOOD_HOST) == []
    nspawn.check_host(FACTS, GOOD_HOST)


def test_requirements_missing() -> None:
    bare = HostFacts(1000, ids.Architecture.ARM64, False, False, False, frozenset(), frozenset(), True)
    missing = missing_requirements(replace(FACTS, root_hash=None), bare)
    text = "\n".join(missing)
    for phrase in ("root privileges", "x86-64 host", "udev", "loop devices", "device-mapper", "root hash",
                   "erofs support", "vfat support"):  # fmt: skip
        assert phrase in text, phrase
    assert len(missing) == 8
    with pytest.raises(HostCannotRun, match="lacks") as e:
        nspawn.check_host(FACTS, bare)
    assert "reprobuild vm /i/image.raw" in e.value.format_message()


def test_host_lacks_hint_never_sends_an_image_without_esp_to_vm() -> None:
    """vm refuses an image without an ESP and suggests shell; shell must not send it back to vm."""
    bare = HostFacts(0, ids.Architecture.AMD64, True, True, False, frozenset({"erofs", "vfat"}), frozenset(), True)
    with pytest.raises(HostCannotRun) as e:
        nspawn.check_host(replace(FACTS, esp=False), bare)
    message = e.value.format_message()
    assert "reprobuild vm" not in message and "no kernel" in message


def test_requirements_dm_verity_only_when_known() -> None:
    no_verity = HostFacts(0, ids.Architecture.AMD64, True, True, True, frozenset({"erofs", "vfat"}),
                          frozenset(), True)  # fmt: skip
    assert missing_requirements(FACTS, no_verity) == ["the dm-verity target in the kernel (module dm_verity)"]
    unknown = replace(no_verity, modules_known=False)
    assert missing_requirements(FACTS, unknown) == []  # cannot tell: let nspawn try
    no_verity_image = replace(FACTS, verity=False, esp=False, root_hash=None)
    assert missing_requirements(no_verity_image, replace(no_verity, device_mapper=False)) == []


def test_prepare_tool_missing(ddis: dict[str, Path]) -> None:
    with pytest.raises(ToolMissing) as e:
        nspawn.prepare(ddis["esp"], boot=True, host=GOOD_HOST, nspawn="/nonexistent/systemd-nspawn")
    assert e.value.hint == "apt-get install systemd-container"


# ---- boot / shell through the CLI ---------------------------------------------------------------


def test_boot_shell_missing_image(tmp_path: Path) -> None:
    for command in ("boot", "shell"):
        code, out = run(command, str(tmp_path / "nope.raw"))
        assert code == 2 and "does not exist" in out


def test_boot_shell_not_a_ddi(tmp_path: Path) -> None:
    junk = tmp_path / "junk.raw"
    junk.write_bytes(b"hello" * 1000)
    for command in ("boot", "shell"):
        code, out = run(command, str(junk))
        assert code == NotADdi.exit_code == 1 and "not a Discoverable Disk Image" in out


@pytest.fixture
def fake_nspawn(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record the argv instead of running nspawn; pretend nspawn is installed."""
    calls: list[list[str]] = []
    def record(cfg: NspawnConfig) -> int:  # run_nspawn gives a loop-mounted root a fresh mount point
        calls.append(build_nspawn_argv(replace(cfg, directory=Path("/mnt/point")) if cfg.loop else cfg))
        return 0

    monkeypatch.setattr(nspawn, "run_nspawn", record)
    monkeypatch.setattr(nspawn.shutil, "which", lambda name: "/usr/bin/" + name)
    return calls


def test_boot_host_lacks(ddis: dict[str, Path], fake_nspawn: list[list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    # Neither dm-verity through nspawn nor the user-space way can work: both lists are named.
    bare = HostFacts(1000, ids.Architecture.AMD64, False, False, False, frozenset(), frozenset(), False)
    monkeypatch.setattr(nspawn, "probe_host", lambda: bare)
    code, out = run("boot", str(ddis["esp"]))
    assert code == 1 and fake_nspawn == []
    assert "root privileges" in out and "loop devices" in out and "squashfs support" in out
    assert "reprobuild vm" in out


SYSTEMD_HOST = HostFacts(0, ids.Architecture.AMD64, True, True, True, frozenset({"squashfs", "vfat"}), frozenset(),
                         False, systemd=True, system_bus=True)  # fmt: skip


def test_boot_and_shell_argv(ddis: dict[str, Path], tmp_path: Path, fake_nspawn: list[list[str]],
                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(nspawn, "probe_host", lambda: SYSTEMD_HOST)
    image = tmp_path / "image.raw"
    image.symlink_to(ddis["esp"])
    cert = ddis["esp"].parent / "verity.crt"
    # Even where dm-verity checks the data, a signed image's root hash must be trusted first.
    code, out = run("boot", str(image))
    assert code == 1 and "no certificate" in out and fake_nspawn == []
    signed = nspawn.trusted_root_hash(inspect_ddi(image), [cert])[0]
    (tmp_path / "image.roothash").write_text(HASH + "\n")  # not the signed one: refused
    code, out = run("boot", "--verity-certificate", str(cert), str(image))
    assert code == 1 and "is not the signed one" in out and fake_nspawn == []
    (tmp_path / "image.roothash").write_text(signed + "\n")
    assert run("boot", "--verity-certificate", str(cert), str(image), "--", "--bind=/srv", "-q")[0] == 0
    assert fake_nspawn[-1] == ["systemd-nspawn", f"--image={image}", "--read-only", "--volatile=state",
                               f"--root-hash={signed}", "--boot", "--bind=/srv", "-q"]  # fmt: skip
    assert run("shell", "--verity-certificate", str(cert), str(image), "-o", "--bind=/x", "--", "cat",
               "/etc/os-release")[0] == 0  # fmt: skip
    assert fake_nspawn[-1][-4:] == ["--bind=/x", "--", "cat", "/etc/os-release"]
    assert "--boot" not in fake_nspawn[-1]
    assert run("shell", "--verity-certificate", str(cert), str(image))[0] == 0
    assert fake_nspawn[-1][-1] == f"--root-hash={signed}"


def test_no_system_bus_means_no_registration(ddis: dict[str, Path], fake_nspawn: list[list[str]],
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    cert = str(ddis["esp"].parent / "verity.crt")
    monkeypatch.setattr(nspawn, "probe_host", lambda: replace(SYSTEMD_HOST, system_bus=False))
    assert run("boot", "--verity-certificate", cert, str(ddis["esp"]))[0] == 0
    assert fake_nspawn[-1][5:8] == ["--register=no", "--keep-unit", "--boot"]
    monkeypatch.setattr(nspawn, "probe_host", lambda: replace(SYSTEMD_HOST, systemd=False))
    assert run("shell", "--verity-certificate", cert, str(ddis["esp"]))[0] == 0
    assert fake_nspawn[-1][-2:] == ["--register=no", "--keep-unit"]


def test_probe_registration(tmp_path: Path) -> None:
    root = fake_root(tmp_path, True)
    assert not probe_host(root, RELEASE, "x86_64", euid=0).can_register
    (root / "run/systemd/system").mkdir(parents=True)
    (root / "run/dbus").mkdir()
    assert not probe_host(root, RELEASE, "x86_64", euid=0).can_register  # systemd, but no bus
    (root / "run/dbus/system_bus_socket").touch()
    assert probe_host(root, RELEASE, "x86_64", euid=0).can_register


# ---- nspawn without device-mapper: the user-space verity check ----------------------------------

NO_DM_HOST = HostFacts(0, ids.Architecture.AMD64, False, True, False, frozenset({"squashfs"}), frozenset(), True)


def test_argv_directory_and_loop() -> None:
    cfg = NspawnConfig(Path("out/image"), directory=Path("out/image"), register=False, command=("true",))
    assert build_nspawn_argv(cfg) == ["systemd-nspawn", "--directory=out/image", "--read-only",
                                      "--volatile=state", "--register=no", "--keep-unit", "--", "true"]  # fmt: skip
    loop = nspawn.LoopMount(Path("/s/obj"), "erofs", 4096, 8192)
    with pytest.raises(ValueError, match="mount point"):
        build_nspawn_argv(NspawnConfig(Path("i.raw"), loop=loop))
    argv = build_nspawn_argv(NspawnConfig(Path("i.raw"), loop=loop, directory=Path("/mnt/x"), boot=True))
    assert argv[:7] == ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c"]
    assert argv[8:13] == ["sh", "erofs", "ro,loop,offset=4096,sizelimit=8192", "/s/obj", "/mnt/x"]
    assert argv[13:] == ["systemd-nspawn", "--directory=/mnt/x", "--read-only", "--volatile=state", "--boot"]
    usr = replace(loop, at="usr")  # a /usr-only image: mounted on /usr of the (tmpfs) root
    assert build_nspawn_argv(NspawnConfig(Path("i.raw"), loop=usr, directory=Path("/mnt/x")))[12] == "/mnt/x/usr"


def _prepare(image: Path, store_root: Path, certificates: tuple[Path, ...] = ()) -> tuple[NspawnConfig, list[str]]:
    said: list[str] = []
    cfg = nspawn.prepare(image, boot=False, command=("true",), host=NO_DM_HOST, nspawn="sh",
                         store=Store(store_root), certificates=certificates, say=said.append)  # fmt: skip
    return cfg, said


def test_userspace_verity_checks_and_keeps_a_copy(ddis: dict[str, Path], tmp_path: Path) -> None:
    cert = ddis["esp"].parent / "verity.crt"
    cfg, said = _prepare(ddis["esp"], tmp_path / "store", (cert,))
    assert cfg.loop is not None and cfg.loop.fstype == "squashfs" and cfg.loop.offset == 0
    assert cfg.root_hash is None and cfg.directory is None and not cfg.register
    assert any("signed by" in m for m in said) and any("checking every block" in m for m in said)
    facts = inspect_ddi(ddis["esp"])
    assert facts.data_extent is not None
    with open(ddis["esp"], "rb") as f:
        f.seek(facts.data_extent[0])
        assert cfg.loop.file.read_bytes() == f.read(cfg.loop.file.stat().st_size)  # the checked bytes
    assert str(cfg.loop.file).startswith(str(tmp_path / "store"))
    again, said = _prepare(ddis["esp"], tmp_path / "store", (cert,))
    assert again.loop == cfg.loop and any("checked before" in m for m in said)


def test_userspace_verity_refuses_a_changed_block(ddis: dict[str, Path], tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    image.write_bytes(ddis["plain"].read_bytes())
    facts = inspect_ddi(image)
    assert facts.data_extent is not None
    with open(image, "r+b") as f:
        f.seek(facts.data_extent[0] + 5 * 4096 + 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(nspawn.ImageUntrusted, match=r"root partition: data block 5 \(bytes 20480\.\.24575"):
        _prepare(image, tmp_path / "store", (ddis["plain"].parent / "verity.crt",))
    assert not list((tmp_path / "store").glob("cache/verified-root/*"))  # nothing kept of it


def test_userspace_verity_needs_a_trusted_certificate(ddis: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(nspawn.ImageUntrusted, match="no certificate to check the signature") as e:
        _prepare(ddis["plain"], tmp_path / "store")
    assert "--verity-certificate" in (e.value.hint or "")
    _, other = generate_rsa_key_and_certificate("someone else")
    (tmp_path / "other.crt").write_bytes(other)
    with pytest.raises(nspawn.ImageUntrusted, match="does not verify with any trusted certificate"):
        _prepare(ddis["plain"], tmp_path / "store", (tmp_path / "other.crt",))
    image = tmp_path / "image.raw"  # a .roothash beside the image that is not the signed one
    image.symlink_to(ddis["plain"])
    (tmp_path / "image.roothash").write_text(HASH + "\n")
    with pytest.raises(nspawn.ImageUntrusted, match="is not the signed one"):
        _prepare(image, tmp_path / "store", (ddis["plain"].parent / "verity.crt",))
    assert not (tmp_path / "store" / "cache").exists()


def test_unsigned_and_unprotected_ddis(tmp_path: Path) -> None:
    from reprobuild.image.ddi import DdiSpec, build_ddi
    from tests.test_diff_support import SEED, make_squashfs, make_tree

    root = make_squashfs(make_tree(tmp_path / "tree"), tmp_path / "root.squashfs")
    plain = tmp_path / "plain" / "image.raw"
    plain.parent.mkdir()
    build_ddi(DdiSpec(architecture="amd64", seed=SEED, root_fs_image=root, output=plain, verity="no"))
    cfg, said = _prepare(plain, tmp_path / "store")
    facts = inspect_ddi(plain)
    assert facts.data_extent is not None and cfg.loop == nspawn.LoopMount(plain.absolute(), "squashfs",
                                                                           *facts.data_extent)  # fmt: skip
    assert any("no dm-verity" in m for m in said)
    hashed = tmp_path / "hashed" / "image.raw"  # verity without a signature: the root hash beside it
    hashed.parent.mkdir()
    result = build_ddi(DdiSpec(architecture="amd64", seed=SEED, root_fs_image=root, output=hashed, verity="hash"))
    with pytest.raises(nspawn.ImageUntrusted, match="no root hash"):
        _prepare(hashed, tmp_path / "store")
    (hashed.parent / "image.roothash").write_text(f"{result.root_hash}\n")
    cfg, said = _prepare(hashed, tmp_path / "store")
    assert cfg.loop is not None and cfg.loop.file.read_bytes() == root.read_bytes()
    assert any("not signed" in m for m in said)
    (hashed.parent / "image.roothash").write_text("ab" * 32 + "\n")  # a wrong hash: the tree's top fails
    with pytest.raises(nspawn.ImageUntrusted, match="does not match the root hash"):
        _prepare(hashed, tmp_path / "store2")


def test_shell_through_cli_finds_the_definitions_certificate(ddis: dict[str, Path], tmp_path: Path,
                                                             fake_nspawn: list[list[str]],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(nspawn, "probe_host", lambda: NO_DM_HOST)
    monkeypatch.setenv("REPROBUILD_STORE", str(tmp_path / "store"))
    (tmp_path / "out").mkdir()
    image = tmp_path / "out" / "image.raw"
    image.symlink_to(ddis["plain"])
    code, out = run("shell", str(image), "--", "true")
    assert code == 1 and "no certificate" in out and fake_nspawn == []
    (tmp_path / "reprobuild.conf").write_text(f"[Signing]\nVerityCertificate={ddis['plain'].parent / 'verity.crt'}\n")
    assert run("shell", str(image), "--", "true")[0] == 0
    assert fake_nspawn[-1][:7] == ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c"]
    assert fake_nspawn[-1][-2:] == ["--", "true"]


def test_directory_and_tar_images(tmp_path: Path, fake_nspawn: list[list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    from reprobuild.rootfs.archive import write_tar

    monkeypatch.setattr(nspawn, "probe_host", lambda: NO_DM_HOST)
    monkeypatch.setenv("REPROBUILD_STORE", str(tmp_path / "store"))
    tree = tmp_path / "image"
    (tree / "usr/lib").mkdir(parents=True)
    (tree / "usr/lib/os-release").write_text("ID=debian\n")
    assert run("shell", str(tree), "--", "true")[0] == 0
    assert fake_nspawn[-1] == ["systemd-nspawn", f"--directory={tree}", "--read-only", "--volatile=state",
                               "--register=no", "--keep-unit", "--", "true"]  # fmt: skip
    write_tar(tree, tmp_path / "image.tar", 1700000000)
    assert run("boot", str(tmp_path / "image.tar"))[0] == 0
    extracted = Path(fake_nspawn[-1][1].removeprefix("--directory="))
    assert extracted.is_relative_to(tmp_path / "store") and (extracted / "usr/lib/os-release").read_text() == "ID=debian\n"
    assert run("boot", str(tmp_path / "image.tar"))[0] == 0 and fake_nspawn[-1] == fake_nspawn[-2]  # kept
    (tree / "usr/lib/os-release").unlink()
    code, out = run("shell", str(tree))
    assert code == 1 and "not an operating system tree" in out


# ---- vm through the CLI (qemu replaced) ---------------------------------------------------------


@pytest.fixture
def fake_qemu(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace vm.run_until / run_interactive; record the QemuConfig they get."""
    seen: dict[str, Any] = {"result": (True, b"")}

    def until(cfg: Any, marker: bytes, timeout: float, say: Any = None) -> tuple[bool, bytes]:
        seen.update(cfg=cfg, marker=marker, timeout=timeout)
        return seen["result"]

    def interactive(cfg: Any, say: Any = None) -> int:
        seen["cfg"] = cfg
        return 7

    monkeypatch.setattr("reprobuild.vm.run_until", until)
    monkeypatch.setattr("reprobuild.vm.run_interactive", interactive)
    return seen


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT disk whose ESP holds an EFI shell script that prints a marker (OVMF's shell runs
    startup.nsh). The line is not echoed (@echo -off) and %1 is empty, so the console shows
    REPROBUILD--STARTUP only if the script really ran."""
    d = tmp_path_factory.mktemp("vm")
    return esp_disk(d / "disk.raw", {"startup.nsh": b"@echo -off\r\necho REPROBUILD-%1-STARTUP\r\nreset -s\r\n"})


def test_vm_missing_image(tmp_path: Path, fake_qemu: dict[str, Any]) -> None:
    code, out = run("vm", str(tmp_path / "nope.raw"))
    assert code == 2 and "does not exist" in out and "cfg" not in fake_qemu


def test_vm_not_a_disk(tmp_path: Path, fake_qemu: dict[str, Any], ddis: dict[str, Path]) -> None:
    junk = tmp_path / "junk.raw"
    junk.write_bytes(bytes(4096))
    code, out = run("vm", str(junk))
    assert code == FormatError.exit_code and "not a bootable disk image" in out
    code, out = run("vm", str(ddis["plain"]))
    assert code == 1 and "no EFI System Partition" in out
    assert "cfg" not in fake_qemu


def test_vm_accepts_bare_esp(tmp_path: Path, fake_qemu: dict[str, Any]) -> None:
    fat = esp_disk(tmp_path / "e.raw", {"EFI/x.txt": b"x"}, with_gpt=False)
    assert run("vm", str(fat), "--kvm", "no")[0] == 7
    assert fake_qemu["cfg"].image == fat


def test_vm_options_reach_qemu(disk: Path, fake_qemu: dict[str, Any]) -> None:
    code, _ = run("vm", str(disk), "-m", "1G", "--cpus", "3", "--kvm", "no", "--no-snapshot", "--", "-s", "-S")
    assert code == 7  # qemu's exit status
    cfg = fake_qemu["cfg"]
    assert (cfg.image, cfg.memory, cfg.cpus, cfg.kvm, cfg.snapshot) == (disk, "1G", 3, "no", False)
    assert cfg.extra_args == ("-s", "-S") and not cfg.secure_boot and cfg.secure_boot_cert is None
    run("vm", str(disk))
    assert fake_qemu["cfg"].snapshot and fake_qemu["cfg"].kvm == "auto"


def test_vm_expect(disk: Path, fake_qemu: dict[str, Any], tmp_path: Path) -> None:
    code, out = run("vm", str(disk), "--expect", "login:", "--console-log", str(tmp_path / "c.log"))
    assert code == 0 and "found 'login:'" in out
    assert fake_qemu["marker"] == b"login:" and fake_qemu["timeout"] == 300
    assert fake_qemu["cfg"].serial_log == tmp_path / "c.log"
    fake_qemu["result"] = (False, b"\x1b[2J\x1b[01;01Hline one\r\n" + b"".join(b"l%d\r\n" % i for i in range(100)))
    code, out = run("vm", str(disk), "--expect", "login:", "--timeout", "5")
    assert code == 1 and fake_qemu["timeout"] == 5
    assert "l99" in out and "l59" not in out and "\x1b" not in out and "did not appear" in out


def test_vm_expect_guest_kernel_crash(disk: Path, fake_qemu: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest kernel oops ends `vm --expect` with the console's tail and a one-line error naming
    the oops line (vm.run_until raises as soon as the report is on the console)."""
    from reprobuild import vm
    from tests.guest_boot import cli_early_crash

    console = b"[    0.5] smpboot: x86: Booting SMP configuration:\r\n[    4.8] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\r\n"

    def crashed(cfg: Any, marker: bytes, timeout: float, say: Any = None) -> tuple[bool, bytes]:
        raise vm.GuestKernelCrashed(vm.kernel_crash(console), marker, 12.3, console)  # type: ignore[arg-type]

    monkeypatch.setattr("reprobuild.vm.run_until", crashed)
    code, out = run("vm", str(disk), "--expect", "login:")
    assert code == 1
    *tail, error = out.strip().splitlines()
    assert "Booting SMP configuration" in "\n".join(tail)
    assert error == ("guest kernel oops before userspace started (12s into the boot, before 'login:' appeared): "
                     "[    4.8] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI")
    assert cli_early_crash(out) == error and cli_early_crash(out.replace("before userspace", "after userspace")) is None


def test_vm_credentials(disk: Path, fake_qemu: dict[str, Any], tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_bytes(b"file-secret\n")
    code, _ = run("vm", str(disk), "--credential", "greeting=hello=world", "--credential-file", f"token={secret}")
    assert code == 7
    creds = fake_qemu["cfg"].credentials
    assert [(c.name, c.value) for c in creds] == [("greeting", b"hello=world"), ("token", b"file-secret\n")]
    for args, message in ((("--credential", "novalue"), "takes NAME=VALUE"),
                          (("--credential-file", f"t={tmp_path / 'missing'}"), "No such file"),
                          (("--credential", "a=1", "--credential", "a=2"), "given twice"),
                          (("--credential", "a/b=1"), "not valid")):  # fmt: skip
        code, out = run("vm", str(disk), *args)
        assert code == 2 and message in out, out
    assert "novalue" not in run("vm", str(disk), "--credential", "novalue")[1]  # never echoed


def test_vm_timeout_needs_expect(disk: Path, fake_qemu: dict[str, Any]) -> None:
    code, out = run("vm", str(disk), "--timeout", "5")
    assert code == UsageError.exit_code and "--expect" in out


def test_vm_secure_boot_without_certificate(tmp_path: Path, disk: Path, fake_qemu: dict[str, Any]) -> None:
    image = tmp_path / "image.raw"
    image.symlink_to(disk)  # nothing beside it: no definition, no certificate
    code, out = run("vm", str(image), "--secure-boot")
    assert code == 2 and "none was found" in out and "--certificate" in out and "cfg" not in fake_qemu
    (tmp_path / "reprobuild.conf").write_text("[Distribution]\nDistribution=debian\nRelease=trixie\n")
    code, out = run("vm", str(image), "--secure-boot")
    assert code == 2 and "SecureBootCertificate=" in out and "not signed" in out
    code, out = run("vm", str(image), "--secure-boot", "-C", str(tmp_path))
    assert code == 2 and "SecureBootCertificate=" in out
    (tmp_path / "reprobuild.conf").write_text("[Signing]\nSecureBootCertificate=keys/missing.crt\n")
    code, out = run("vm", str(image), "--secure-boot")
    assert code == 2 and "missing.crt" in out and "no such file" in out


def test_vm_secure_boot_certificate_from_definition(tmp_path: Path, disk: Path, sb_cert: Path,
                                                    fake_qemu: dict[str, Any]) -> None:  # fmt: skip
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys/sb.crt").write_bytes(sb_cert.read_bytes())
    (tmp_path / "reprobuild.conf").write_text("[Signing]\nSecureBootCertificate=keys/sb.crt\n")
    (tmp_path / "out").mkdir()
    image = tmp_path / "out/image.raw"  # where build puts it: DIRECTORY/out
    image.symlink_to(disk)
    code, out = run("vm", str(image), "--secure-boot", "--kvm", "no")
    assert code == 7 and "keys/sb.crt" in out
    cfg = fake_qemu["cfg"]
    assert cfg.secure_boot and cfg.secure_boot_cert == sb_cert.read_bytes()


def test_vm_certificate_option(tmp_path: Path, disk: Path, sb_cert: Path, fake_qemu: dict[str, Any]) -> None:
    code, _ = run("vm", str(disk), "--certificate", str(sb_cert))  # implies --secure-boot
    assert code == 7 and fake_qemu["cfg"].secure_boot and fake_qemu["cfg"].secure_boot_cert == sb_cert.read_bytes()
    bad = tmp_path / "bad.crt"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnonsense\n-----END CERTIFICATE-----\n")
    code, out = run("vm", str(disk), "--certificate", str(bad))
    assert code == 1 and "not an X.509 certificate" in out
    code, out = run("vm", str(disk), "--certificate", str(tmp_path / "none.crt"))
    assert code == 2 and "does not exist" in out


def test_vm_unsigned_image_refused(tmp_path: Path, disk: Path, sb_cert: Path, fake_qemu: dict[str, Any]) -> None:
    image = tmp_path / "image.raw"
    image.symlink_to(disk)
    (tmp_path / "image.raw.manifest.json").write_text(json.dumps({"boot": {"uki_signed": False}}))
    code, out = run("vm", str(image), "--certificate", str(sb_cert))
    assert code == 2 and "not signed" in out and "cfg" not in fake_qemu


# ---- vm with real qemu + OVMF (TCG, so it runs anywhere; each well under a minute) ------------


@pytest.mark.boot
@pytest.mark.timeout(240)
def test_vm_expect_real_firmware(disk: Path, tmp_path: Path) -> None:
    start = time.monotonic()
    code, out = run("vm", str(disk), "--kvm", "no", "-m", "256M", "--cpus", "1", "--expect",
                    "REPROBUILD--STARTUP", "--timeout", "180", "--console-log", str(tmp_path / "console.log"))  # fmt: skip
    elapsed = time.monotonic() - start
    assert code == 0, out
    assert b"REPROBUILD--STARTUP" in (tmp_path / "console.log").read_bytes()
    print(f"\nOVMF (TCG) ran the disk's startup.nsh in {elapsed:.1f}s")


@pytest.mark.boot
@pytest.mark.timeout(240)
def test_vm_secure_boot_real_firmware_refuses_unsigned(disk: Path, sb_cert: Path) -> None:
    """With Secure Boot enforced nothing unsigned runs: OVMF's own shell is refused, so the script
    never runs and the firmware gives up (run_until stops at once instead of waiting 180 s)."""
    start = time.monotonic()
    code, out = run("vm", str(disk), "--kvm", "no", "-m", "256M", "--cpus", "1", "--certificate", str(sb_cert),
                    "--expect", "REPROBUILD--STARTUP", "--timeout", "180")  # fmt: skip
    elapsed = time.monotonic() - start
    assert code == 1 and "Security Violation" in out and "No bootable option" in out
    assert elapsed < 120
    print(f"\nSecure Boot refused the unsigned shell; firmware gave up after {elapsed:.1f}s")


@pytest.mark.live
@pytest.mark.boot
@pytest.mark.timeout(600)
def test_vm_secure_boot_signed_uki(boot_images: dict[str, object], tmp_path: Path) -> None:
    """A real signed UKI (Debian kernel, busybox initrd) through `reprobuild vm --certificate`."""
    cert = tmp_path / "sb.crt"
    cert.write_bytes(boot_images["cert"])  # type: ignore[arg-type]
    from tests.guest_boot import cli_early_crash, retry_early_crash_once

    start = time.monotonic()
    (code, out), note = retry_early_crash_once(
        lambda: run("vm", str(boot_images["signed"]), "-m", "1G", "--certificate", str(cert),
                    "--expect", MARKER.decode(), "--timeout", "400"),
        lambda result: cli_early_crash(result[1]))  # fmt: skip
    assert code == 0, f"{note}\n{out}"
    print(f"\nsigned UKI booted to its marker under Secure Boot in {time.monotonic() - start:.1f}s")


@pytest.mark.boot
@pytest.mark.timeout(240)
def test_vm_interactive_console_on_a_terminal(tmp_path: Path) -> None:
    """Interactive `vm` on a pseudo-terminal: the console reaches the terminal and Ctrl-A x quits
    (the script leaves the firmware's shell waiting for input, so nothing else ends qemu)."""
    import os
    import pty
    import select
    import subprocess
    import sys

    disk = esp_disk(tmp_path / "disk.raw", {"startup.nsh": b"@echo -off\r\necho REPROBUILD-%1-STARTUP\r\n"})
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "reprobuild", "vm", str(disk), "--kvm", "no", "-m", "256M",
                             "--cpus", "1"], stdin=terminal, stdout=terminal, stderr=terminal,
                            start_new_session=True)  # fmt: skip
    os.close(terminal)
    seen = b""
    try:
        deadline = time.monotonic() + 180
        while b"REPROBUILD--STARTUP" not in seen and time.monotonic() < deadline:
            if select.select([controller], [], [], 1)[0]:
                seen += os.read(controller, 65536)
        assert b"REPROBUILD--STARTUP" in seen, seen[-2000:]
        assert b"Ctrl-A x quits" in seen
        os.write(controller, b"\x01x")  # qemu's mux escape: quit
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
        os.close(controller)


def test_main_imports_the_module_that_registers_the_named_command() -> None:
    """main() imports only the module COMMANDS names for a command: the table must name every
    command and the module that really registers it (all modules are registered above)."""
    import subprocess
    import sys

    from reprobuild.cli import COMMANDS

    assert set(cli.commands) == set(COMMANDS)
    for name, command in cli.commands.items():
        assert command.callback.__module__ == f"reprobuild.cli.{COMMANDS[name]}", name
    program = ("import sys\nfrom reprobuild.cli import main\nsys.argv = ['reprobuild', 'lock', '--help']\n"
               "try:\n    main()\nexcept SystemExit:\n    pass\n"
               "print(sorted(m for m in sys.modules if m.startswith('reprobuild.cli.')))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", program], check=True, capture_output=True, text=True).stdout
    assert out.strip().splitlines()[-1] == "['reprobuild.cli.lock', 'reprobuild.cli.options']"
