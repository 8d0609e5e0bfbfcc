"""qemu runner: argv building (pure), OVMF key enrollment, KVM probe, and real Secure Boot boots."""

from __future__ import annotations

import base64
import re
import shutil
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from reprobuild.image.authenticode import sign_pe
from reprobuild.image.esp import make_esp
from reprobuild.image.initrd import make_initrd_cpio
from reprobuild.image.uki import build_uki
from reprobuild.signer import file_signer
from reprobuild.vm import (
    EFI_GLOBAL_VARIABLE,
    EFI_IMAGE_SECURITY_DATABASE,
    Credential,
    Firmware,
    GuestKernelCrashed,
    KernelCrash,
    QemuConfig,
    VarStoreInvalid,
    VmError,
    build_qemu_argv,
    enroll_certificate,
    firmware_paths,
    kernel_crash,
    probe_kvm,
    read_variables,
    resolve_accel,
    run_until,
    signature_list_x509,
)
from reprobuild.x509 import generate_rsa_key_and_certificate
from tests.guest_boot import BootRetried, boot_until

FW = Firmware(Path("/fw/CODE.fd"), Path("/tmp/VARS.fd"))


def test_argv_plain_tcg() -> None:
    argv = build_qemu_argv(QemuConfig(image=Path("/img/disk.raw"), memory="1G", cpus=3), FW, "tcg")
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64"
    assert "-machine q35 -accel tcg,thread=single -cpu max -m 1G -smp 3" in joined
    assert "-serial stdio" in joined and "-display none" in joined and "-nic none" in joined
    assert "if=pflash,format=raw,unit=0,file=/fw/CODE.fd,readonly=on" in argv
    assert "if=pflash,format=raw,unit=1,file=/tmp/VARS.fd" in argv
    assert "if=none,id=disk0,format=raw,file=/img/disk.raw,snapshot=on" in argv
    assert "smm=on" not in joined and "cfi.pflash01" not in joined


def test_argv_secure_boot_kvm_extra() -> None:
    cfg = QemuConfig(image=Path("d.raw"), secure_boot=True, snapshot=False, extra_args=("-s",))
    argv = build_qemu_argv(cfg, FW, "kvm", serial="file:/tmp/log")
    joined = " ".join(argv)
    assert "-machine q35,smm=on -accel kvm -cpu host" in joined
    assert "-global driver=cfi.pflash01,property=secure,value=on" in joined
    assert "if=none,id=disk0,format=raw,file=d.raw" in argv
    assert argv[-1] == "-s" and "-serial file:/tmp/log" in joined


def test_argv_tcg_single_threaded_kvm_unchanged() -> None:
    """TCG runs single-threaded (no multi-threaded TCG race with the kernel's text patching) with
    the vCPU count as given; KVM's -accel carries no TCG option."""

    def accel_smp(cpus: int, accel: str) -> tuple[str, str]:
        argv = build_qemu_argv(QemuConfig(image=None, cpus=cpus), FW, accel)  # type: ignore[arg-type]
        assert argv.count("-smp") == 1 and argv.count("-accel") == 1
        return argv[argv.index("-accel") + 1], argv[argv.index("-smp") + 1]

    assert accel_smp(2, "tcg") == ("tcg,thread=single", "2")
    assert accel_smp(1, "tcg") == ("tcg,thread=single", "1")
    assert accel_smp(4, "kvm") == ("kvm", "4")
    assert QemuConfig(image=None).cpus == 2


def test_argv_without_disk() -> None:
    assert not any("disk0" in a for a in build_qemu_argv(QemuConfig(image=None), FW, "tcg"))


def test_firmware_detection() -> None:
    code, template = firmware_paths(QemuConfig(image=None))
    assert code.name == "OVMF_CODE_4M.fd" and template.name == "OVMF_VARS_4M.fd"
    code, template = firmware_paths(QemuConfig(image=None, secure_boot=True))
    assert code.name == "OVMF_CODE_4M.secboot.fd" and template.name == "OVMF_VARS_4M.snakeoil.fd"
    explicit = firmware_paths(QemuConfig(image=None, firmware_code=Path("/c"), firmware_vars=Path("/v")))
    assert explicit == (Path("/c"), Path("/v"))


@pytest.fixture(scope="module")
def cert_der() -> bytes:
    _, pem = generate_rsa_key_and_certificate("enroll test")
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def test_enroll_certificate(cert_der: bytes) -> None:
    _, template_path = firmware_paths(QemuConfig(image=None, secure_boot=True))
    template = template_path.read_bytes()
    enrolled = enroll_certificate(template, cert_der)
    assert len(enrolled) == len(template) and enrolled[:0x48] == template[:0x48]
    assert enroll_certificate(template, cert_der) == enrolled
    before = {(v.name, v.vendor): v for v in read_variables(template)}
    after = {(v.name, v.vendor): v for v in read_variables(enrolled)}
    assert before.keys() == after.keys()
    keys = {("PK", EFI_GLOBAL_VARIABLE), ("KEK", EFI_GLOBAL_VARIABLE), ("db", EFI_IMAGE_SECURITY_DATABASE)}
    for ident, var in after.items():
        if ident in keys:
            assert var.data == signature_list_x509(cert_der) and var.attributes == 0x27
            assert var.timestamp == before[ident].timestamp
        else:
            assert var == before[ident]
    assert any(name == "SecureBootEnable" for name, _ in after)  # Secure Boot stays switched on


def test_enroll_needs_secure_boot_template(cert_der: bytes) -> None:
    _, plain = firmware_paths(QemuConfig(image=None))
    with pytest.raises(VarStoreInvalid, match="PK/KEK/db"):
        enroll_certificate(plain.read_bytes(), cert_der)
    with pytest.raises(VarStoreInvalid):
        enroll_certificate(b"\xff" * 4096, cert_der)


def test_signature_list_layout(cert_der: bytes) -> None:
    esl = signature_list_x509(cert_der)
    assert esl[:16].hex() == "a159c0a5e494a74a87b5ab155c2bf072"  # EFI_CERT_X509_GUID, mixed-endian
    assert int.from_bytes(esl[16:20], "little") == len(esl) == 28 + 16 + len(cert_der)
    assert esl.endswith(cert_der)


def test_kvm_probe_is_bounded() -> None:
    assert probe_kvm(qemu="/nonexistent/qemu") is False
    start = time.monotonic()
    result = probe_kvm()
    assert isinstance(result, bool) and time.monotonic() - start < 25
    assert resolve_accel(QemuConfig(image=None, kvm="no")) == "tcg"
    assert resolve_accel(QemuConfig(image=None, kvm="yes")) == "kvm"


# ---- real boots: Debian kernel + systemd-stub + busybox initrd, signed by us, Secure Boot on ----

MARKER = b"REPROBUILD-BOOT-MARKER"


@pytest.fixture(scope="module")
def boot_images(tmp_path_factory: pytest.TempPathFactory, debian_boot_files: dict[str, Path]) -> dict[str, object]:
    work = tmp_path_factory.mktemp("boot")
    tree = work / "tree"
    (tree / "bin").mkdir(parents=True)
    shutil.copy(debian_boot_files["busybox"], tree / "bin" / "busybox")
    (tree / "bin" / "sh").symlink_to("busybox")
    for d in ("dev", "proc", "sys"):
        (tree / d).mkdir()
    # The marker is assembled at run time so the kernel's echo of its command line cannot match it.
    (tree / "init").write_text("#!/bin/sh\n/bin/busybox mount -t proc proc /proc\n"
                               "echo $(/bin/busybox cat /proc/cmdline) REPROBUILD-BOOT-$(/bin/busybox echo MARKER)\n"
                               "/bin/busybox poweroff -f\n")  # fmt: skip
    (tree / "init").chmod(0o755)
    make_initrd_cpio(tree, work / "initrd.zst", 1700000000)
    uki = build_uki(debian_boot_files["stub"].read_bytes(), debian_boot_files["kernel"].read_bytes(),
                    (work / "initrd.zst").read_bytes(), "console=ttyS0 panic=-1", "ID=debian\nVERSION_ID=12\n",
                    str(debian_boot_files["uname"]))  # fmt: skip
    key, cert = generate_rsa_key_and_certificate("reprobuild boot test")
    start = time.perf_counter()
    signed = sign_pe(uki, file_signer(key, cert))
    sign_seconds = time.perf_counter() - start
    make_esp({"EFI/BOOT/BOOTX64.EFI": signed}, work / "signed.img", volume_id=1, epoch=1700000000)
    make_esp({"EFI/BOOT/BOOTX64.EFI": uki}, work / "unsigned.img", volume_id=1, epoch=1700000000)
    return {"cert": cert, "signed": work / "signed.img", "unsigned": work / "unsigned.img",
            "uki_size": len(uki), "sign_seconds": sign_seconds, "work": work}  # fmt: skip


@pytest.mark.live
@pytest.mark.boot
@pytest.mark.timeout(600)
def test_secure_boot_with_our_key(boot_images: dict[str, object]) -> None:
    cfg = QemuConfig(image=boot_images["signed"], memory="1G", secure_boot=True,  # type: ignore[arg-type]
                     secure_boot_cert=boot_images["cert"], serial_log=boot_images["work"] / "sb.log")  # type: ignore[arg-type,operator]  # fmt: skip
    start = time.monotonic()
    boot = boot_until(cfg, MARKER, timeout=400)
    elapsed = time.monotonic() - start
    console = boot.console
    assert boot.found, boot.tail(3000)
    assert b"Secure boot enabled" in console
    assert b"console=ttyS0 panic=-1 " + MARKER in console  # init saw the UKI's .cmdline in /proc/cmdline
    print(f"\nUKI {boot_images['uki_size']} bytes, signed in {boot_images['sign_seconds']:.2f}s, "
          f"booted to marker with Secure Boot in {elapsed:.1f}s")


@pytest.mark.live
@pytest.mark.boot
@pytest.mark.timeout(600)
def test_secure_boot_refuses_unsigned(boot_images: dict[str, object]) -> None:
    cfg = QemuConfig(image=boot_images["unsigned"], memory="1G", secure_boot=True,  # type: ignore[arg-type]
                     secure_boot_cert=boot_images["cert"])  # type: ignore[arg-type]
    found, console = run_until(cfg, MARKER, timeout=400)
    assert not found
    assert b"Access Denied" in console or b"Security Violation" in console


# ---- the console watcher, with a stand-in qemu (no firmware needed) ----------------------------

FAKE_QEMU = """#!/bin/sh
case "$*" in
  *"-accel kvm"*) echo "KVM internal error. Suberror: 1" >&2; exec sleep 60 ;;
esac
echo "booting"
sleep 0.2
echo "hello MARKER-42 world"
exec sleep 60
"""


def _fake_cfg(tmp_path: Path, script: str, kvm: str = "no") -> QemuConfig:
    qemu = tmp_path / "qemu"
    qemu.write_text(script)
    qemu.chmod(0o755)
    (tmp_path / "code.fd").write_bytes(b"code")
    (tmp_path / "vars.fd").write_bytes(b"vars")
    return QemuConfig(image=tmp_path / "disk.raw", qemu=str(qemu), kvm=kvm,  # type: ignore[arg-type]
                      firmware_code=tmp_path / "code.fd", firmware_vars=tmp_path / "vars.fd",
                      serial_log=tmp_path / "serial.log")  # fmt: skip


def test_run_until_finds_marker_and_kills(tmp_path: Path) -> None:
    start = time.monotonic()
    found, console = run_until(_fake_cfg(tmp_path, FAKE_QEMU), b"MARKER-42", timeout=30)
    assert found and b"booting" in console
    assert time.monotonic() - start < 10  # did not wait for the 60 s sleep: qemu was killed
    assert b"MARKER-42" in (tmp_path / "serial.log").read_bytes()


def test_run_until_timeout(tmp_path: Path) -> None:
    start = time.monotonic()
    found, console = run_until(_fake_cfg(tmp_path, FAKE_QEMU), b"NEVER", timeout=1.5)
    assert not found and b"MARKER-42" in console
    assert 1.4 < time.monotonic() - start < 10


def test_run_until_falls_back_to_tcg_when_kvm_breaks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("reprobuild.vm.kvm_status", lambda qemu: (True, "probed"))  # a probe that passed
    said: list[str] = []
    found, _ = run_until(_fake_cfg(tmp_path, FAKE_QEMU, kvm="auto"), b"MARKER-42", timeout=30, say=said.append)
    assert found
    lines = [m for m in said if m.startswith("accelerator")]
    assert lines[0] == "accelerator: kvm (probed)" and "tcg" in lines[1] and "KVM internal error" in lines[1]
    # and progress while waiting: updates of the "booting" stage with the console's last line
    from reprobuild.progress import Update

    updates = [m for m in said if isinstance(m, Update)]
    assert updates and all(u.stage == "booting" and u.total == 30 for u in updates)
    with pytest.raises(VmError, match="KVM internal error"):
        run_until(_fake_cfg(tmp_path, FAKE_QEMU, kvm="yes"), b"MARKER-42", timeout=30)


def test_resolve_accel_says_which_and_why(monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    assert resolve_accel(QemuConfig(image=None, kvm="no"), said.append) == "tcg"
    assert said == ["accelerator: tcg, software emulation (--kvm no)"]
    monkeypatch.setattr("reprobuild.vm.kvm_status", lambda qemu: (False, "there is no /dev/kvm"))
    said.clear()
    assert resolve_accel(QemuConfig(image=None, kvm="auto"), said.append) == "tcg"
    assert said[-1] == "accelerator: tcg, software emulation, slower (there is no /dev/kvm; --kvm no skips the probe)"


def test_last_line() -> None:
    from reprobuild.vm import last_line

    assert last_line(b"BdsDxe: loading\r\n\x1b[0mWelcome to Debian\r\n\r\n") == "Welcome to Debian"
    assert last_line(b"") == ""


# ---- credentials for the guest: in private files, never in qemu's argv --------------------------

SECRET = "s3cret-Value with spaces\nand a newline"

CRED_QEMU = """#!/bin/sh
tr '\\0' ' ' < /proc/$$/cmdline > "$(dirname "$0")/argv.txt"
while [ $# -gt 0 ]; do
  if [ "$1" = -smbios ]; then
    file="${2#type=11,path=}"
    stat -c 'MODE %a' "$file"
    stat -c 'DIR %a' "$(dirname "$file")"
    printf 'SMBIOS %s\\n' "$(cat "$file")"
  fi
  shift
done
echo DONE-MARKER
exec sleep 60
"""


def test_credential_names_and_smbios_strings() -> None:
    assert Credential("a.b-c_d", b"x\x00y").smbios_string() == b"io.systemd.credential.binary:a.b-c_d=eAB5"
    for bad in ("", ".", "..", "a/b", "a=b", "a b", "x" * 256):
        with pytest.raises(VmError, match="credential name"):
            Credential(bad, b"v")


def test_credentials_reach_qemu_through_private_files(tmp_path: Path) -> None:
    cfg = _fake_cfg(tmp_path, CRED_QEMU)
    cfg = QemuConfig(**{**cfg.__dict__, "credentials": (Credential("app.token", SECRET.encode()),
                                                        Credential("other", b"2"))})  # fmt: skip
    found, console = run_until(cfg, b"DONE-MARKER", timeout=30)
    assert found, console
    argv = (tmp_path / "argv.txt").read_text()
    assert "type=11,path=" in argv and "app.token" not in argv
    assert "s3cret" not in argv and base64.b64encode(SECRET.encode()).decode() not in argv
    text = console.decode()
    assert text.count("MODE 600") == 2 and text.count("DIR 700") == 2
    assert f"SMBIOS io.systemd.credential.binary:app.token={base64.b64encode(SECRET.encode()).decode()}" in text
    assert "SMBIOS io.systemd.credential.binary:other=Mg==" in text
    path = re.search(r"type=11,path=(\S+)", argv)
    assert path and not Path(path.group(1)).exists() and not Path(path.group(1)).parent.exists()  # removed


def test_no_credentials_no_smbios(tmp_path: Path) -> None:
    found, _ = run_until(_fake_cfg(tmp_path, CRED_QEMU), b"DONE-MARKER", timeout=30)
    assert found and "-smbios" not in (tmp_path / "argv.txt").read_text()


# ---- guest kernel crashes: found on the console, and the wait ends at once ----------------------

# Around the crash: lines of a real TCG boot of lock/bootable (Debian's 6.12 kernel). PANIC is the
# line test_real_kernel_panic_ends_the_wait's boot printed; the oops lines follow the kernel's
# format (arch/x86/kernel/dumpstack.c __die_header: "Oops: " since 6.x), here the int3 oops a
# multi-threaded TCG guest can hit in sched_clock_cpu, and an older kernel's BUG.
BOOT_START = (b"[    0.537023] smpboot: x86: Booting SMP configuration:\r\n"
              b"[    4.876549] sched_clock: Marking stable (4928064384, -54976078)->(5249155130, -376066824)\r\n")  # fmt: skip
USERSPACE = (b"[    6.998705] Run /init as init process\r\n"
             b"[    7.155995] systemd[1]: Failed to find module 'autofs4'\r\n")  # fmt: skip
INT3_OOPS = (b"[    4.881002] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\r\n"
             b"[    4.881002] CPU: 1 UID: 0 PID: 0 Comm: swapper/1 Not tainted 6.12.117+deb13-amd64 #1  Debian 6.12.117-1\r\n"
             b"[    4.881002] RIP: 0010:sched_clock_cpu+0x5/0x1c0\r\n"
             b"[    4.881002] ---[ end trace 0000000000000000 ]---\r\n")  # fmt: skip
OLD_OOPS = (b"[   14.220554] kernel BUG at arch/x86/kernel/jump_label.c:73!\r\n"
            b"[   14.220729] invalid opcode: 0000 [#1] SMP PTI\r\n"
            b"[   14.220938] RIP: 0010:__jump_label_patch+0x1b9/0x1d0\r\n")  # fmt: skip
PANIC = b"[    2.484381] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\r\n"


def test_kernel_crash_oops_before_userspace() -> None:
    crash = kernel_crash(BOOT_START + INT3_OOPS)
    assert crash == KernelCrash("oops", "[    4.881002] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI",
                                "sched_clock_cpu+0x5/0x1c0", True)  # fmt: skip
    assert crash.describe() == "[    4.881002] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI at sched_clock_cpu+0x5/0x1c0"
    assert crash.when == "before userspace started"


def test_kernel_crash_after_userspace_and_older_format() -> None:
    crash = kernel_crash(BOOT_START + USERSPACE + OLD_OOPS)
    assert crash is not None and crash.kind == "oops" and not crash.before_userspace
    assert crash.line == "[   14.220729] invalid opcode: 0000 [#1] SMP PTI"
    assert crash.where == "__jump_label_patch+0x1b9/0x1d0"
    # systemd's own lines count as userspace when a quiet kernel hides "Run /init"
    assert not kernel_crash(b"[    7.1] systemd[1]: Starting x\r\n" + OLD_OOPS).before_userspace  # type: ignore[union-attr]


def test_kernel_crash_panic_and_first_of_several() -> None:
    crash = kernel_crash(BOOT_START + PANIC)
    assert crash == KernelCrash("panic", PANIC.decode().strip(), "", True)
    first = kernel_crash(BOOT_START + INT3_OOPS + PANIC)
    assert first is not None and first.kind == "oops" and "int3" in first.line


def test_kernel_crash_none_on_a_clean_boot() -> None:
    console = (BOOT_START + USERSPACE + b"\x1b[0;32m  OK  \x1b[0m] Reached target multi-user.target\r\n"
               b"[   52.6] i801_smbus 0000:00:1f.3: Enabling SMBus device\r\n"
               b"[    0.0] WARNING: CPU: 0 PID: 1 at kernel/x.c:1 f+0x1/0x2\r\n"
               b"Debian GNU/Linux 13 reprobuild ttyS0\r\n\r\nreprobuild login: root (automatic login)\r\n")  # fmt: skip
    assert kernel_crash(console) is None
    assert kernel_crash(b"") is None


OOPS_QEMU = """#!/bin/sh
printf '[    0.5] smpboot: x86: Booting SMP configuration:\\r\\n'
sleep 0.2
printf '[    4.8] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\\r\\n'
sleep 0.3
printf '[    4.8] RIP: 0010:sched_clock_cpu+0x5/0x1c0\\r\\n'
printf '[    4.8] ---[ end trace 0000000000000000 ]---\\r\\n'
exec sleep 60
"""

PANIC_NO_END_QEMU = """#!/bin/sh
printf '[    6.9] Run /init as init process\\r\\n'
printf '[    9.1] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\\r\\n'
exec sleep 60
"""


def test_run_until_stops_at_a_kernel_oops(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(GuestKernelCrashed) as info:
        run_until(_fake_cfg(tmp_path, OOPS_QEMU), b"login:", timeout=120)
    assert time.monotonic() - start < 10  # not the 120 s timeout: qemu was killed at the report's end
    message = str(info.value)
    assert "\n" not in message and message.startswith("guest kernel oops before userspace started (")
    assert "before 'login:' appeared): [    4.8] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI at sched_clock_cpu+0x5/0x1c0" in message
    assert info.value.crash.before_userspace and b"end trace" in info.value.console
    assert b"Oops: int3" in (tmp_path / "serial.log").read_bytes()


def test_run_until_stops_at_a_panic_after_a_grace(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(GuestKernelCrashed, match=r"^guest kernel panic after userspace started .*Attempted to kill init"):
        run_until(_fake_cfg(tmp_path, PANIC_NO_END_QEMU), b"login:", timeout=120)
    assert time.monotonic() - start < 15  # no end-of-report line: the grace of a few seconds, then stop


def test_run_until_marker_before_an_oops_wins(tmp_path: Path) -> None:
    script = OOPS_QEMU.replace("exec sleep 60", "").replace("Booting SMP", "login:")
    found, console = run_until(_fake_cfg(tmp_path, script + "exec sleep 60\n"), b"login:", timeout=30)
    assert found and b"Oops" not in console


# ---- the boot tests' helper: one retry, only for a crash before userspace, never silent ---------

COUNTING_QEMU = """#!/bin/sh
dir="$(dirname "$0")"
echo x >> "$dir/boots"
n=$(wc -l < "$dir/boots")
if [ "$n" -le {crashes} ]; then
  printf '[    0.5] smpboot: x86: Booting SMP configuration:\\r\\n'
  {userspace}
  printf '[    4.8] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\\r\\n[    4.8] ---[ end trace 0 ]---\\r\\n'
else
  printf 'reprobuild login: \\r\\n'
fi
exec sleep 60
"""


def _counting_cfg(tmp_path: Path, crashes: int, userspace: bool = False) -> QemuConfig:
    run_init = "printf '[    6.9] Run /init as init process\\r\\n'" if userspace else ""
    return _fake_cfg(tmp_path, COUNTING_QEMU.replace("{crashes}", str(crashes)).replace("{userspace}", run_init))


def test_boot_helper_retries_once_after_an_early_crash_and_says_so(tmp_path: Path) -> None:
    with pytest.warns(BootRetried, match=r"retried once after a guest kernel crash before userspace: .*Oops: int3"):
        boot = boot_until(_counting_cfg(tmp_path, crashes=1), b"login:", timeout=30)
    assert boot.found and boot.note.startswith("boot retried once") and boot.tail().startswith(boot.note)
    assert (tmp_path / "boots").read_text().count("x") == 2
    assert b"Oops" in (tmp_path / "serial.log.first-attempt").read_bytes()
    assert b"Oops" not in (tmp_path / "serial.log").read_bytes()


def test_boot_helper_fails_on_a_second_crash_naming_the_retry(tmp_path: Path) -> None:
    with pytest.warns(BootRetried), pytest.raises(pytest.fail.Exception) as info:
        boot_until(_counting_cfg(tmp_path, crashes=2), b"login:", timeout=30)
    assert str(info.value).startswith("boot retried once after a guest kernel crash before userspace")
    assert "\nguest kernel oops before userspace started" in str(info.value)
    assert (tmp_path / "boots").read_text().count("x") == 2


def test_boot_helper_does_not_retry_a_crash_after_userspace(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    with pytest.raises(pytest.fail.Exception, match="^guest kernel oops after userspace started"):
        boot_until(_counting_cfg(tmp_path, crashes=1, userspace=True), b"login:", timeout=30)
    assert (tmp_path / "boots").read_text().count("x") == 1 and not recwarn.list
    (tmp_path / "boots").unlink()
    boot = boot_until(_counting_cfg(tmp_path, crashes=0), b"login:", timeout=30)  # no crash: one boot, no note
    assert boot.found and boot.note == "" and (tmp_path / "boots").read_text().count("x") == 1


@pytest.mark.live
@pytest.mark.boot
@pytest.mark.timeout(600)
def test_real_kernel_panic_ends_the_wait(debian_boot_files: dict[str, Path], tmp_path: Path) -> None:
    """Debian's kernel with an initrd that has no /init and no root= panics before userspace
    ("VFS: Unable to mount root fs"); run_until stops seconds after, not at its 400 s timeout."""
    (tmp_path / "tree/dev").mkdir(parents=True)
    make_initrd_cpio(tmp_path / "tree", tmp_path / "initrd.zst", 1700000000)
    uki = build_uki(debian_boot_files["stub"].read_bytes(), debian_boot_files["kernel"].read_bytes(),
                    (tmp_path / "initrd.zst").read_bytes(), "console=ttyS0", "ID=debian\nVERSION_ID=12\n",
                    str(debian_boot_files["uname"]))  # fmt: skip
    make_esp({"EFI/BOOT/BOOTX64.EFI": uki}, tmp_path / "esp.img", volume_id=1, epoch=1700000000)
    cfg = QemuConfig(image=tmp_path / "esp.img", memory="512M", serial_log=tmp_path / "panic.log")
    start = time.monotonic()
    with pytest.raises(GuestKernelCrashed) as info:
        run_until(cfg, MARKER, timeout=400)
    elapsed = time.monotonic() - start
    crash = info.value.crash
    assert crash.kind == "panic" and crash.before_userspace, crash
    assert "Kernel panic - not syncing: VFS: Unable to mount root fs" in crash.line
    assert str(info.value).startswith("guest kernel panic before userspace started (")
    assert elapsed < 300
    print(f"\nreal kernel panic reported after {elapsed:.1f}s: {info.value}")
