"""OpenPGP verification of repository metadata with gpgv.

We never parse the clearsigned text ourselves: gpgv writes the bytes it actually verified to
``--output`` and those, and only those, are returned, so nothing outside the signed part (text
before the header, a second message after the signature) can be smuggled into the Release we
parse. On top of that the clearsigned envelope must be exactly one message, as apt requires.

Acceptance rule (apt's, see apt ``methods/gpgv.cc``): at least one signature must be good
(GOODSIG + VALIDSIG) from a key in the given keyrings; any BADSIG refuses the whole file
(someone altered it); signatures by keys we do not have (NO_PUBKEY), or by expired/revoked
keys, are ignored when another signature is good — Debian signs each Release with several keys
(e.g. the bookworm and trixie archive keys), and an older host keyring may lack one of them —
and are named in the error when nothing good remains.

Cost: one gpgv process (~10 ms) per file.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from reprobuild.errors import RepositoryError, ToolMissing

DEFAULT_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

_BEGIN_SIGNED = b"-----BEGIN PGP SIGNED MESSAGE-----"
_BEGIN_SIGNATURE = b"-----BEGIN PGP SIGNATURE-----"
_END_SIGNATURE = b"-----END PGP SIGNATURE-----"

# gpgv status keywords (doc/DETAILS in GnuPG) that make a signature unusable, with what to tell people.
_BAD_STATUS = {
    "BADSIG": "BAD signature (the data was altered) from key {}",
    "ERRSIG": "signature from key {} could not be checked",
    "NO_PUBKEY": "no public key {} in the keyrings",
    "EXPKEYSIG": "signature from expired key {}",
    "REVKEYSIG": "signature from revoked key {}",
    "EXPSIG": "expired signature from key {}",
}
_GPGV_TIMEOUT = 60  # seconds; gpgv on a few hundred KiB takes milliseconds


class SignatureError(RepositoryError):
    """Metadata is unsigned, badly signed, or signed only by keys we do not trust."""


@dataclass(frozen=True, slots=True)
class SignatureCheck:
    """What gpgv said about one verification (fingerprints of good keys, reasons for the rest)."""

    good_fingerprints: tuple[str, ...]
    problems: tuple[str, ...]


def verify_clearsigned(data: bytes, keyrings: list[Path], what: str = "InRelease") -> bytes:
    """Verify an OpenPGP cleartext-signed file; return the signed text exactly as gpgv output it.

    Raises SignatureError when the envelope is not one clearsigned message, when no signature is
    good, or when any signature is BAD; ToolMissing when gpgv is not installed.
    """
    _check_envelope(data, what)
    with tempfile.TemporaryDirectory(prefix="reprobuild-gpgv-") as tmp:
        signed = Path(tmp) / "signed"
        message = Path(tmp) / "message"
        message.write_bytes(data)
        _run_gpgv(["--output", str(signed), str(message)], keyrings, tmp, what)
        try:
            return signed.read_bytes()
        except OSError as e:
            raise SignatureError(f"{what}: gpgv produced no signed content") from e


def verify_detached(data: bytes, signature: bytes, keyrings: list[Path], what: str = "Release") -> bytes:
    """Verify ``data`` against a detached signature (``Release`` + ``Release.gpg``); return ``data``."""
    with tempfile.TemporaryDirectory(prefix="reprobuild-gpgv-") as tmp:
        sig = Path(tmp) / "signature"
        message = Path(tmp) / "message"
        sig.write_bytes(signature)
        message.write_bytes(data)
        _run_gpgv([str(sig), str(message)], keyrings, tmp, what)
    return data


def parse_status(status: str) -> SignatureCheck:
    """Interpret gpgv ``--status-fd`` output (pure); see the module docstring for the rule."""
    good: list[str] = []
    goodsig_keys: set[str] = set()
    problems: list[str] = []
    for line in status.splitlines():
        if not line.startswith("[GNUPG:] "):
            continue
        words = line.split()[1:]
        if not words:
            continue
        keyword, args = words[0], words[1:]
        if keyword == "GOODSIG" and args:
            goodsig_keys.add(args[0].upper())
        elif keyword == "VALIDSIG" and args:
            # args[0] is the signing (sub)key fingerprint, args[9] (when present) the primary key's.
            # A VALIDSIG without its GOODSIG (e.g. after EXPKEYSIG) does not count as good.
            signing = args[0].upper()
            if any(signing.endswith(k) for k in goodsig_keys):
                good.append(args[9].upper() if len(args) >= 10 else signing)
        elif keyword in _BAD_STATUS:
            key = args[0] if args else "?"
            problems.append(_BAD_STATUS[keyword].format(key))
    return SignatureCheck(tuple(good), tuple(problems))


def _run_gpgv(args: list[str], keyrings: list[Path], tmp: str, what: str) -> SignatureCheck:
    gpgv = shutil.which("gpgv")
    if gpgv is None:
        raise ToolMissing("gpgv", "gpgv", "to verify repository signatures")
    keyring_args: list[str] = []
    for i, keyring in enumerate(keyrings):
        keyring_args += ["--keyring", str(_binary_keyring(keyring, Path(tmp) / f"keyring{i}.gpg"))]
    if not keyring_args:
        raise SignatureError(f"{what}: no keyring given to verify against")
    cmd = [gpgv, "--status-fd", "1", *keyring_args, *args]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            check=False,  # the status lines decide, not the exit code (see _BAD_STATUS)
            timeout=_GPGV_TIMEOUT,
            # gpgv needs no home; an empty one keeps the user's ~/.gnupg out of the decision.
            env={"LC_ALL": "C", "PATH": "/usr/bin:/bin", "GNUPGHOME": tmp},
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SignatureError(f"{what}: running gpgv failed: {e}") from e
    check = parse_status(proc.stdout.decode("utf-8", "replace"))
    bad = [p for p in check.problems if p.startswith("BAD")]
    if bad:
        raise SignatureError(f"{what}: {'; '.join(bad)}", hint="the file was modified after signing")
    if not check.good_fingerprints:
        reasons = "; ".join(check.problems) or _last_line(proc.stderr) or "not signed"
        raise SignatureError(
            f"{what}: no good signature from a trusted key ({reasons})",
            hint="keyrings used: " + ", ".join(str(k) for k in keyrings),
        )
    if proc.returncode not in (0, 2):
        # 2 = some signature was not checkable (tolerated above when another is good).
        raise SignatureError(f"{what}: gpgv failed (exit {proc.returncode}): {_last_line(proc.stderr)}")
    return check


def _binary_keyring(path: Path, scratch: Path) -> Path:
    """gpgv 2.2 reads only binary keyrings; dearmor an ``.asc`` one into ``scratch``."""
    try:
        head = path.read_bytes()
    except OSError as e:
        raise SignatureError(f"cannot read keyring {path}: {e}") from e
    if not head.lstrip().startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----"):
        return path
    scratch.write_bytes(dearmor(head))
    return scratch


def dearmor(armored: bytes) -> bytes:
    """ASCII armor → binary OpenPGP (pure; RFC 4880 §6.2). Concatenates all blocks in the text."""
    out = bytearray()
    inside = in_body = False
    body: list[bytes] = []
    for line in armored.splitlines():
        line = line.strip()
        if line.startswith(b"-----BEGIN PGP"):
            inside, in_body, body = True, False, []
        elif line.startswith(b"-----END PGP"):
            out += base64.b64decode(b"".join(body))
            inside = False
        elif inside and not in_body:
            in_body = not line  # headers end at the first empty line
        elif inside and not line.startswith(b"="):  # "=XXXX" is the CRC-24 line
            body.append(line)
    return bytes(out)


def _check_envelope(data: bytes, what: str) -> None:
    """Exactly one clearsigned message and nothing around it (apt's SplitClearSignedFile rule)."""
    if not data.startswith(_BEGIN_SIGNED):
        raise SignatureError(f"{what} is not an OpenPGP clearsigned message (unsigned metadata refused)")
    if data.count(_BEGIN_SIGNED) != 1 or data.count(_BEGIN_SIGNATURE) != 1 or data.count(_END_SIGNATURE) != 1:
        raise SignatureError(f"{what} contains more than one signed message or signature block")
    tail = data[data.index(_END_SIGNATURE) + len(_END_SIGNATURE) :]
    if tail.strip():
        raise SignatureError(f"{what} has unsigned data after its signature")


def _last_line(stderr: bytes) -> str:
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else ""
