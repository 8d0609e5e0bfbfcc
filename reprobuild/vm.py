"""Boot an image in qemu with OVMF (UEFI), optionally with Secure Boot enforced and our key enrolled.

Three pieces:
* firmware discovery (Debian's ``ovmf`` package) and a pure ``build_qemu_argv``;
* ``probe_kvm``: KVM can exist and still fail (nested virtualisation often gives "KVM internal
  error … emulation failure" as soon as OVMF runs), so the probe boots OVMF itself for a moment;
* ``enroll_certificate``: a pure editor for the OVMF variable store that sets PK, KEK and db to
  one X.509 certificate, so images signed by our key (and nothing else) pass Secure Boot.

``run_until`` boots headless and watches the serial console for a marker (tests, ``verify``);
``run_interactive`` hands the console to the user. qemu is always killed on the way out. A guest
kernel oops or panic on the console ends the wait at once (``GuestKernelCrashed``, naming the
line) instead of running into the timeout.

TCG (software emulation) runs single-threaded (``-accel tcg,thread=single``: all vCPUs take
turns on one host thread) rather than qemu's default of one host thread per vCPU: multi-threaded
TCG with more than one vCPU sometimes makes the guest kernel oops early ("Oops: int3" while it
patches its static keys, docs/running.md). ``QemuConfig.cpus`` is used as given either way.

Credentials for systemd in the guest (``QemuConfig.credentials``) travel as SMBIOS type 11
strings (``io.systemd.credential.binary:NAME=BASE64``) that qemu reads from private files
(``-smbios type=11,path=FILE``, each 0600 in a 0700 temporary directory, removed after the boot),
so no value ever appears in qemu's command line (``/proc/PID/cmdline`` is world-readable).
"""

from __future__ import annotations

import base64
import os
import re
import selectors
import shutil
import signal
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from reprobuild.errors import FormatError, ReprobuildError, ToolMissing
from reprobuild.progress import Update

QEMU = "qemu-system-x86_64"
FIRMWARE_DIRS = (Path("/usr/share/OVMF"), Path("/usr/share/ovmf"), Path("/usr/share/qemu"))
# Debian's ovmf package: 4 MiB flash builds (code and vars must come as a matching pair).
CODE_PLAIN = ("OVMF_CODE_4M.fd", "OVMF_CODE.fd")
CODE_SECBOOT = ("OVMF_CODE_4M.secboot.fd", "OVMF_CODE.secboot.fd")
VARS_PLAIN = ("OVMF_VARS_4M.fd", "OVMF_VARS.fd")
# A store with Secure Boot already switched on (PK/KEK/db = Debian's test "snakeoil" key); we
# replace its keys with ours when a certificate is given.
VARS_SECBOOT = ("OVMF_VARS_4M.snakeoil.fd", "OVMF_VARS.snakeoil.fd")
KVM_PROBE_SECONDS = 15.0
KVM_FAILED = b"KVM internal error"  # what qemu prints (stderr) when KVM cannot run the guest

# qemu's -accel for each accelerator; TCG single-threaded (module docstring, docs/running.md).
ACCEL_ARG = {"kvm": "kvm", "tcg": "tcg,thread=single"}

Accel = Literal["kvm", "tcg"]
Say = Callable[[str], None]


class VmError(ReprobuildError):
    """qemu could not be started or the firmware/variable store is unusable."""


class GuestKernelCrashed(VmError):
    """The guest's kernel oopsed or panicked on the serial console before the marker appeared."""

    def __init__(self, crash: KernelCrash, marker: bytes, seconds: float, console: bytes) -> None:
        self.crash, self.console = crash, console
        super().__init__(f"guest kernel {crash.kind} {crash.when} ({seconds:.0f}s into the boot, "
                         f"before {marker.decode(errors='replace')!r} appeared): {crash.describe()}")  # fmt: skip


# systemd.exec(5) "Credentials": a credential name is a valid file name (no "/", not "." or
# ".."), at most 255 bytes; we also keep out characters that could end the SMBIOS string.
CREDENTIAL_NAME = re.compile(r"(?!\.{1,2}$)[^/\x00-\x20=\x7f]{1,255}")
SMBIOS_CREDENTIAL_PREFIX = "io.systemd.credential.binary:"  # systemd.system-credentials(7), SMBIOS type 11


@dataclass(frozen=True)
class Credential:
    """A systemd system credential for the guest: ``name`` and its bytes."""

    name: str
    value: bytes

    def __post_init__(self) -> None:
        if not CREDENTIAL_NAME.fullmatch(self.name):
            raise VmError(f"credential name {self.name!r} is not valid: use a file name without '/', '=' "
                          "or blanks, at most 255 characters")  # fmt: skip

    def smbios_string(self) -> bytes:
        """The SMBIOS type 11 string systemd imports (binary form: any bytes survive)."""
        return f"{SMBIOS_CREDENTIAL_PREFIX}{self.name}={base64.b64encode(self.value).decode()}".encode()


@contextmanager
def credential_args(credentials: Sequence[Credential]) -> Iterator[list[str]]:
    """qemu arguments passing ``credentials`` through private files: ``-smbios type=11,path=FILE``
    for each, the files 0600 in a fresh 0700 directory that is removed on exit. The values are in
    the files only, never in the arguments."""
    if not credentials:
        yield []
        return
    with tempfile.TemporaryDirectory(prefix="reprobuild-credentials-") as tmp:
        args = []
        for i, cred in enumerate(credentials):
            path = Path(tmp) / f"credential-{i}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(cred.smbios_string())
            args += ["-smbios", f"type=11,path={path}"]
        yield args


@dataclass(frozen=True)
class QemuConfig:
    """How to boot ``image`` (a raw disk image). ``firmware_code``/``firmware_vars`` default to
    the ovmf package's files (the vars file is a template: it is always copied, never written).
    ``secure_boot_cert`` (PEM or DER) is enrolled as PK, KEK and db when ``secure_boot``."""

    image: Path | None  # None: no disk (firmware only, as the KVM probe uses)
    memory: str = "2G"
    cpus: int = 2
    secure_boot: bool = False
    secure_boot_cert: bytes | None = None
    firmware_code: Path | None = None
    firmware_vars: Path | None = None
    kvm: Literal["auto", "yes", "no"] = "auto"
    serial_log: Path | None = None
    snapshot: bool = True  # never write to the image under test
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    qemu: str = QEMU
    credentials: tuple[Credential, ...] = ()  # passed through private files (credential_args)


@dataclass(frozen=True)
class Firmware:
    code: Path
    vars: Path  # a private, writable copy


def _find(names: Sequence[str], dirs: Sequence[Path] = FIRMWARE_DIRS) -> Path:
    for name in names:
        for d in dirs:
            if (d / name).is_file():
                return d / name
    raise ToolMissing(names[0], "ovmf", "to boot images with UEFI")


def firmware_paths(cfg: QemuConfig) -> tuple[Path, Path]:
    """(code, vars template) for ``cfg``: explicit paths, else the ovmf package's files."""
    code = cfg.firmware_code or _find(CODE_SECBOOT if cfg.secure_boot else CODE_PLAIN)
    template = cfg.firmware_vars or _find(VARS_SECBOOT if cfg.secure_boot else VARS_PLAIN)
    return code, template


def build_qemu_argv(cfg: QemuConfig, firmware: Firmware, accel: Accel, serial: str = "stdio") -> list[str]:
    """The qemu command line (pure). ``serial`` is a qemu chardev spec (``stdio``, ``mon:stdio``,
    ``file:PATH``). Headless: no display, no monitor, no network, no default devices; the disk is
    virtio-blk (boot index 1), opened read-only-in-effect with ``snapshot=on`` unless disabled.
    TCG is single-threaded (``ACCEL_ARG``)."""
    argv = [cfg.qemu,
        "-machine", "q35,smm=on" if cfg.secure_boot else "q35",
        "-accel", ACCEL_ARG[accel],
        "-cpu", "host" if accel == "kvm" else "max",
        "-m", cfg.memory,
        "-smp", str(cfg.cpus),
        "-nodefaults", "-display", "none", "-monitor", "none", "-no-reboot", "-nic", "none",
        "-serial", serial,
    ]  # fmt: skip
    if cfg.secure_boot:
        # The secboot OVMF build keeps its variable store in SMM; flash must be SMM-only.
        argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    argv += [
        "-drive", f"if=pflash,format=raw,unit=0,file={firmware.code},readonly=on",
        "-drive", f"if=pflash,format=raw,unit=1,file={firmware.vars}",
    ]  # fmt: skip
    if cfg.image is not None:
        argv += [
            "-drive", f"if=none,id=disk0,format=raw,file={cfg.image}" + (",snapshot=on" if cfg.snapshot else ""),
            "-device", "virtio-blk-pci,drive=disk0,bootindex=1",
        ]  # fmt: skip
    return argv + list(cfg.extra_args)


# ---- OVMF variable store (EDK2 MdeModulePkg/Include/Guid/VariableFormat.h) ---------------------

FV_HEADER = struct.Struct("<16s16sQ4sIHHHBB")  # ZeroVector, FileSystemGuid, FvLength, "_FVH", Attributes, HeaderLength, Checksum, ExtHeaderOffset, Reserved, Revision
VARIABLE_STORE_HEADER = struct.Struct("<16sIBBHI")  # Signature GUID, Size, Format 0x5A, State 0xFE, Reserved, Reserved1
# AUTHENTICATED_VARIABLE_HEADER: StartId 0x55AA, State, Reserved, Attributes, MonotonicCount,
# TimeStamp (EFI_TIME, 16 bytes), PubKeyIndex, NameSize, DataSize, VendorGuid.
AUTH_VARIABLE_HEADER = struct.Struct("<HBBIQ16sIII16s")
AUTHENTICATED_VARIABLE_GUID = uuid.UUID("aaf32c78-947b-439a-a180-2e144ec37792")
VARIABLE_START_ID = 0x55AA
VAR_ADDED = 0x3F  # the state of a live variable; deleted ones have more bits cleared
EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
EFI_CERT_X509_GUID = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
# Owner GUID recorded with our certificate in each signature list: fixed, so the store is reproducible.
REPROBUILD_OWNER = uuid.UUID("5eb6b5c4-2a0f-4c7e-9b53-7265707262c1")


class VarStoreInvalid(FormatError):
    """An OVMF variable store is malformed or too full for the change."""


@dataclass(frozen=True)
class EfiVariable:
    name: str
    vendor: uuid.UUID
    attributes: int
    data: bytes
    monotonic_count: int = 0
    timestamp: bytes = bytes(16)
    pubkey_index: int = 0

    def pack(self) -> bytes:
        name = (self.name + "\0").encode("utf-16-le")
        header = AUTH_VARIABLE_HEADER.pack(VARIABLE_START_ID, VAR_ADDED, 0, self.attributes, self.monotonic_count,
                                           self.timestamp, self.pubkey_index, len(name), len(self.data),
                                           self.vendor.bytes_le)  # fmt: skip
        record = header + name + self.data
        return record + b"\xff" * (-len(record) % 4)  # next header 4-aligned over erased (0xFF) flash


def _store_bounds(fd: bytes) -> tuple[int, int]:
    try:
        _zero, _guid, fv_length, sig, _attrs, header_length, *_ = FV_HEADER.unpack_from(fd, 0)
        if sig != b"_FVH" or fv_length > len(fd):
            raise VarStoreInvalid("OVMF vars: no firmware volume header")
        guid, size, fmt, state, *_ = VARIABLE_STORE_HEADER.unpack_from(fd, header_length)
    except struct.error as e:
        raise VarStoreInvalid("OVMF vars: truncated headers") from e
    if uuid.UUID(bytes_le=guid) != AUTHENTICATED_VARIABLE_GUID or fmt != 0x5A or state != 0xFE:
        raise VarStoreInvalid("OVMF vars: not an authenticated variable store (format/state/GUID)")
    if header_length + size > fv_length:
        raise VarStoreInvalid("OVMF vars: store larger than the volume")
    return header_length + VARIABLE_STORE_HEADER.size, header_length + size


def read_variables(fd: bytes) -> list[EfiVariable]:
    """The live (state VAR_ADDED) variables of an OVMF vars file, in store order."""
    pos, end = _store_bounds(fd)
    out = []
    while pos + AUTH_VARIABLE_HEADER.size <= end:
        start, state, _r, attrs, count, stamp, pki, name_size, data_size, vendor = AUTH_VARIABLE_HEADER.unpack_from(fd, pos)
        if start != VARIABLE_START_ID:
            break
        body = pos + AUTH_VARIABLE_HEADER.size
        if body + name_size + data_size > end or name_size % 2:
            raise VarStoreInvalid(f"OVMF vars: variable at {pos:#x} runs past the store")
        if state == VAR_ADDED:
            name = fd[body : body + name_size].decode("utf-16-le").rstrip("\0")
            data = fd[body + name_size : body + name_size + data_size]
            out.append(EfiVariable(name, uuid.UUID(bytes_le=vendor), attrs, data, count, stamp, pki))
        pos = body + name_size + data_size
        pos += -pos % 4
    return out


def signature_list_x509(cert_der: bytes, owner: uuid.UUID = REPROBUILD_OWNER) -> bytes:
    """An EFI_SIGNATURE_LIST holding one X.509 certificate (UEFI spec 32.4.1)."""
    entry = owner.bytes_le + cert_der
    return EFI_CERT_X509_GUID.bytes_le + struct.pack("<III", 28 + len(entry), 0, len(entry)) + entry


def enroll_certificate(template: bytes, cert_der: bytes) -> bytes:
    """A copy of the OVMF vars ``template`` whose PK, KEK and db hold exactly ``cert_der``.

    The template must already have Secure Boot set up (e.g. Debian's OVMF_VARS_4M.snakeoil.fd,
    which has PK/KEK/db and SecureBootEnable): we replace the key variables' data and keep their
    attributes and timestamps. The store is rewritten compactly (deleted records dropped), the
    rest of the area erased (0xFF), the firmware volume header untouched. Pure and deterministic.
    """
    start, end = _store_bounds(template)
    variables = read_variables(template)
    wanted = {("PK", EFI_GLOBAL_VARIABLE), ("KEK", EFI_GLOBAL_VARIABLE), ("db", EFI_IMAGE_SECURITY_DATABASE)}
    present = {(v.name, v.vendor) for v in variables}
    if not wanted <= present:
        raise VarStoreInvalid("OVMF vars: template has no PK/KEK/db; use a Secure Boot template "
                              "(OVMF_VARS_4M.snakeoil.fd or .ms.fd)")  # fmt: skip
    esl = signature_list_x509(cert_der)
    records = b"".join(
        EfiVariable(v.name, v.vendor, v.attributes, esl, v.monotonic_count, v.timestamp, v.pubkey_index).pack()
        if (v.name, v.vendor) in wanted else v.pack()
        for v in variables
    )  # fmt: skip
    if start + len(records) > end:
        raise VarStoreInvalid("OVMF vars: the store is too small for the new keys")
    return template[:start] + records + b"\xff" * (end - start - len(records)) + template[end:]


def _cert_der(cert: bytes) -> bytes:
    if b"-----BEGIN" in cert:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        return x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER)
    return cert


@contextmanager
def prepared_firmware(cfg: QemuConfig) -> Iterator[Firmware]:
    """Firmware code path plus a private copy of the vars (keys enrolled if asked), removed after."""
    code, template = firmware_paths(cfg)
    with tempfile.TemporaryDirectory(prefix="reprobuild-vm-") as tmp:
        vars_copy = Path(tmp) / "OVMF_VARS.fd"
        data = template.read_bytes()
        if cfg.secure_boot and cfg.secure_boot_cert:
            data = enroll_certificate(data, _cert_der(cfg.secure_boot_cert))
        vars_copy.write_bytes(data)
        yield Firmware(code, vars_copy)


# ---- running qemu -------------------------------------------------------------------------------


def _qemu_binary(cfg: QemuConfig) -> str:
    path = shutil.which(cfg.qemu)
    if not path:
        raise ToolMissing(cfg.qemu, "qemu-system-x86", "to boot images")
    return path


def _watch(argv: list[str], marker: bytes, timeout: float, stop_on: Sequence[bytes] = (),
           log: Path | None = None, say: Say | None = None) -> tuple[bool, bytes, bytes]:  # fmt: skip
    """Run argv, read stdout (the serial console) and stderr until marker, a stop pattern, a
    guest kernel oops or panic (read on for up to CRASH_GRACE_SECONDS, to the end of its report),
    exit, or timeout; always kill the process group. Returns (found, console, stderr). ``say``
    gets a progress update (seconds waited, the console's last line) about twice a second."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    console, errors = bytearray(), bytearray()
    found = False
    crash_at: int | None = None  # where on the console a kernel crash report starts
    scanned = 0  # console bytes already searched for one
    started = time.monotonic()
    deadline = started + timeout
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None
    sel.register(proc.stdout, selectors.EVENT_READ, console)
    sel.register(proc.stderr, selectors.EVENT_READ, errors)
    log_file = log.open("wb") if log else None
    try:
        open_streams = 2
        while open_streams and not found:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for key, _ in sel.select(timeout=min(remaining, 0.5)):
                chunk = os.read(key.fileobj.fileno(), 65536)  # type: ignore[union-attr]
                if not chunk:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                key.data.extend(chunk)
                if key.data is console and log_file:
                    log_file.write(chunk)
                    log_file.flush()
            found = marker in console
            if say is not None:
                say(Update("booting", int(time.monotonic() - started), int(timeout), "s", last_line(console)))
            if any(p in console or p in errors for p in stop_on):
                break
            if crash_at is None and not found and (crash := KERNEL_CRASH.search(console, max(0, scanned - 64))):
                crash_at = crash.start()
                deadline = min(deadline, time.monotonic() + CRASH_GRACE_SECONDS)
            scanned = len(console)
            if crash_at is not None and console.find(CRASH_DUMP_END, crash_at) != -1:
                break
    finally:
        sel.close()
        if log_file:
            log_file.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return found, bytes(console), bytes(errors)


# ---- guest kernel crashes on the console --------------------------------------------------------

# The kernel's oops header, die()'s "<what>: <error code> [#<count>]" (arch/x86/kernel/dumpstack.c
# __die_header; Linux 6.x prefixes it with "Oops: ", e.g. "Oops: int3: 0000 [#1] PREEMPT SMP NOPTI"),
# and panic()'s "Kernel panic - not syncing: <reason>" (kernel/panic.c).
KERNEL_CRASH = re.compile(rb"(?P<oops>: [0-9a-f]{4,16} \[#\d+\])|(?P<panic>Kernel panic - not syncing: )")
KERNEL_RIP = re.compile(rb"RIP: [0-9a-f]{4}:([^\s]+)")  # where it happened (x86 __show_regs)
# The kernel says this just before it starts init (init/main.c run_init_process); systemd's own
# lines stand in when a quiet command line hides it.
USERSPACE_STARTED = (b" as init process", b"systemd[1]: ")
CRASH_DUMP_END = b"---[ end "  # the last line of an oops or panic report
CRASH_GRACE_SECONDS = 3.0  # after an oops header, read on this long for its RIP line and end


@dataclass(frozen=True)
class KernelCrash:
    """A guest kernel oops or panic found on the console."""

    kind: Literal["oops", "panic"]
    line: str  # the oops/panic line as printed, with its timestamp
    where: str  # the RIP (function+offset/size) of an oops, "" if not shown
    before_userspace: bool  # init had not been started when it happened

    @property
    def when(self) -> str:
        return "before userspace started" if self.before_userspace else "after userspace started"

    def describe(self) -> str:
        return self.line + (f" at {self.where}" if self.where else "")


def kernel_crash(console: bytes) -> KernelCrash | None:
    """The first kernel oops or panic on a serial console capture, or None (pure)."""
    match = KERNEL_CRASH.search(console)
    if match is None:
        return None
    start = max(console.rfind(b"\n", 0, match.start()), console.rfind(b"\r", 0, match.start())) + 1
    end = min((i for i in (console.find(b"\n", match.end()), console.find(b"\r", match.end())) if i != -1),
              default=len(console))  # fmt: skip
    line = _ANSI.sub("", console[start:end].decode("utf-8", "replace"))
    line = "".join(c for c in line if c.isprintable()).strip()
    kind = "oops" if match.group("oops") else "panic"
    rip = KERNEL_RIP.search(console, end) if kind == "oops" else None
    where = rip.group(1).decode("utf-8", "replace") if rip else ""
    started = any(0 <= console.find(p) < start for p in USERSPACE_STARTED)
    return KernelCrash(kind, line, where, not started)


_ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>c])")  # terminal control sequences


def last_line(console: bytes, width: int = 60) -> str:
    """The console's last non-empty line, printable and at most ``width`` characters (pure)."""
    for raw in reversed(console[-4096:].splitlines()):
        text = _ANSI.sub("", raw.decode("utf-8", "replace"))
        text = "".join(c for c in text if c.isprintable()).strip()
        if text:
            return text[:width]
    return ""


def kvm_status(qemu: str = QEMU, timeout: float = KVM_PROBE_SECONDS) -> tuple[bool, str]:
    """Does KVM really work here, and why (or why not), in a few words? Boots plain OVMF with
    ``-accel kvm`` (no disk) and waits for its boot manager to speak on the serial console.
    Not usable when /dev/kvm is missing or unusable, qemu reports "KVM internal error", or nothing
    appears within ``timeout`` seconds. Cost: ≤ timeout."""
    if not os.path.exists("/dev/kvm"):
        return False, "there is no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not readable and writable for this user"
    if not shutil.which(qemu):
        return False, f"{qemu} is not installed"
    try:
        code, template = _find(CODE_PLAIN), _find(VARS_PLAIN)
    except ToolMissing:
        return False, "no OVMF firmware to probe KVM with"
    with tempfile.TemporaryDirectory(prefix="reprobuild-kvm-") as tmp:
        vars_copy = Path(tmp) / "vars.fd"
        shutil.copyfile(template, vars_copy)
        cfg = QemuConfig(image=None, memory="256M", cpus=1, qemu=qemu)
        argv = build_qemu_argv(cfg, Firmware(code, vars_copy), "kvm")
        found, _console, errors = _watch(argv, b"BdsDxe", timeout, stop_on=(KVM_FAILED, b"failed to initialize kvm"))
    if KVM_FAILED in errors:
        return False, "KVM fails to run the firmware: KVM internal error, as under nested virtualisation"
    if b"failed to initialize kvm" in errors:
        return False, "qemu failed to initialise KVM"
    if not found:
        return False, f"the KVM probe boot showed nothing in {timeout:.0f}s"
    return True, "a probe boot ran the firmware under KVM"


def probe_kvm(qemu: str = QEMU, timeout: float = KVM_PROBE_SECONDS) -> bool:
    """Does KVM really work here? (:func:`kvm_status` without the reason.)"""
    return kvm_status(qemu, timeout)[0]


def resolve_accel(cfg: QemuConfig, say: Say | None = None) -> Accel:
    """``yes`` → kvm, ``no`` → tcg, ``auto`` → kvm only if :func:`kvm_status` says it really
    works. ``say`` is told which accelerator and why."""
    report = say or (lambda _m: None)
    if cfg.kvm == "yes":
        report("accelerator: kvm (--kvm yes)")
        return "kvm"
    if cfg.kvm == "no":
        report("accelerator: tcg, software emulation (--kvm no)")
        return "tcg"
    report("checking whether KVM works (booting the firmware once)")
    ok, why = kvm_status(cfg.qemu)
    report(f"accelerator: kvm ({why})" if ok else
           f"accelerator: tcg, software emulation, slower ({why}; --kvm no skips the probe)")  # fmt: skip
    return "kvm" if ok else "tcg"


# Console lines after which OVMF will not boot anything: stop waiting early.
FIRMWARE_GAVE_UP = (b"No bootable option or device was found",)


def _boot_once(cfg: QemuConfig, accel: Accel, marker: bytes, timeout: float,
               stop_on: Sequence[bytes], say: Say | None = None) -> tuple[bool, bytes, bytes]:  # fmt: skip
    with prepared_firmware(cfg) as firmware, credential_args(cfg.credentials) as creds:  # fresh for every boot
        return _watch(build_qemu_argv(cfg, firmware, accel) + creds, marker, timeout,
                      stop_on=(KVM_FAILED, *stop_on), log=cfg.serial_log, say=say)  # fmt: skip


def run_until(
    cfg: QemuConfig, marker: bytes, timeout: float, stop_on: Sequence[bytes] = FIRMWARE_GAVE_UP,
    say: Say | None = None,
) -> tuple[bool, bytes]:
    """Boot headless and watch the serial console for ``marker``; qemu is killed when it appears,
    when a ``stop_on`` pattern appears, at ``timeout`` seconds, or earlier if it exits. Returns
    (found, console output); the console is also written to ``cfg.serial_log`` if set.

    A guest kernel oops or panic before the marker raises :class:`GuestKernelCrashed` (its
    message names the oops line; ``.console`` holds the capture) within a few seconds of it.

    With ``kvm="auto"``, a boot that hits "KVM internal error" after a passing probe (seen on
    nested hosts where KVM works only intermittently) is retried once under TCG.
    """
    _qemu_binary(cfg)
    accel = resolve_accel(cfg, say)
    started = time.monotonic()
    found, console, errors = _boot_once(cfg, accel, marker, timeout, stop_on, say)
    if accel == "kvm" and cfg.kvm == "auto" and KVM_FAILED in errors:
        if say is not None:
            say("accelerator: tcg, software emulation (KVM failed during the boot: KVM internal error); booting again")
        started = time.monotonic()
        found, console, errors = _boot_once(cfg, "tcg", marker, timeout, stop_on, say)
    if not found and (crash := kernel_crash(console)) is not None:
        raise GuestKernelCrashed(crash, marker, time.monotonic() - started, console)
    if not found and errors.strip() and not console:
        raise VmError(f"qemu failed ({accel}): {errors.decode(errors='replace').strip()[:500]}")
    return found, console


def run_interactive(cfg: QemuConfig, say: Say | None = None) -> int:
    """Boot with the serial console (and qemu monitor, Ctrl-A c) on this terminal; qemu's exit code."""
    _qemu_binary(cfg)
    accel = resolve_accel(cfg, say)
    with prepared_firmware(cfg) as firmware, credential_args(cfg.credentials) as creds:
        argv = build_qemu_argv(cfg, firmware, accel, serial="mon:stdio") + creds
        return subprocess.run(argv, check=False).returncode
