"""``pkcs11:`` URIs (RFC 7512) naming an RSA signing key in a PKCS#11 token, and PIN sources (pure
apart from reading a PIN file; python-pkcs11 is not imported here, so reading a configuration
does not load it).

A URI names the token and the key, e.g.
``pkcs11:token=release;object=secure-boot?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin``.

* Path attributes (``;``-separated, percent-encoded): ``token`` (label), ``object`` (key label),
  ``id`` (CKA_ID bytes), ``type`` (``private`` if given), ``manufacturer``, ``serial``, ``model``.
* Query attributes (``&``-separated): ``module-path`` (the PKCS#11 library; default p11-kit's
  proxy when installed), ``pin-source``. RFC 7512 leaves the interpretation of pin-source to the
  implementation; here it is ``file:PATH`` (or a plain path): the PIN is the file's first line,
  or ``env:NAME``: the PIN is in the environment variable NAME. ``pin-value`` is refused: a PIN
  written into a configuration file or a command line ends up in shell histories and process
  lists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes

from reprobuild.errors import ReprobuildError

SCHEME = "pkcs11:"
# A key source: a key file, or a ``pkcs11:`` URI.
KeySource = Path | str


def is_uri(source: KeySource) -> bool:
    """Whether a key source is a ``pkcs11:`` URI (else it is a key file)."""
    return isinstance(source, str) and source.startswith(SCHEME)


PATH_ATTRIBUTES = ("token", "object", "id", "type", "manufacturer", "serial", "model")
QUERY_ATTRIBUTES = ("module-path", "pin-source")
# Where Debian's p11-kit-modules puts the proxy that reaches every module p11-kit knows of.
P11_KIT_PROXY = Path("/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so")


class TokenError(ReprobuildError):
    """A PKCS#11 token or key is unreachable, locked, or refuses to sign."""


@dataclass(frozen=True)
class Pkcs11Uri:
    path: tuple[tuple[str, bytes], ...]  # sorted (attribute, decoded value)
    module_path: str | None
    pin_source: str | None

    def get(self, name: str) -> bytes | None:
        return dict(self.path).get(name)

    def text(self, name: str) -> str | None:
        value = self.get(name)
        return value.decode("utf-8", "replace") if value is not None else None

    def identity(self) -> str:
        """The URI without its PIN source, attributes sorted: which key, for cache keys and messages."""
        parts = [f"{k}={v.hex() if k == 'id' else v.decode('utf-8', 'replace')}" for k, v in self.path]
        return SCHEME + ";".join(parts)


def parse_uri(text: str) -> Pkcs11Uri:
    """Parse a ``pkcs11:`` URI (pure). Raises ValueError naming what is wrong (never the PIN)."""
    if not text.startswith(SCHEME):
        raise ValueError("not a pkcs11: URI")
    body, _, query = text[len(SCHEME):].partition("?")
    path: dict[str, bytes] = {}
    for item in filter(None, body.split(";")):
        name, eq, value = item.partition("=")
        if not eq or name not in PATH_ATTRIBUTES:
            raise ValueError(f"unsupported pkcs11: path attribute {name!r} (known: {', '.join(PATH_ATTRIBUTES)})")
        if name in path:
            raise ValueError(f"pkcs11: attribute {name!r} given twice")
        path[name] = unquote_to_bytes(value)
    queries: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        name, eq, value = item.partition("=")
        if name == "pin-value":
            raise ValueError("pin-value= is not accepted (a PIN in a configuration leaks): "
                             "use pin-source=file:PATH or pin-source=env:NAME")  # fmt: skip
        if not eq or name not in QUERY_ATTRIBUTES:
            raise ValueError(f"unsupported pkcs11: query attribute {name!r} (known: {', '.join(QUERY_ATTRIBUTES)})")
        queries[name] = unquote_to_bytes(value).decode("utf-8")
    if "token" not in path and "serial" not in path:
        raise ValueError("the pkcs11: URI must name the token (token=LABEL or serial=…)")
    if "object" not in path and "id" not in path:
        raise ValueError("the pkcs11: URI must name the key (object=LABEL or id=…)")
    if path.get("type", b"private") != b"private":
        raise ValueError("a signing key is type=private")
    return Pkcs11Uri(tuple(sorted(path.items())), queries.get("module-path"), queries.get("pin-source"))


def read_pin(uri: Pkcs11Uri, environ: Mapping[str, str]) -> str | None:
    """The PIN from the URI's pin-source, or None when there is none (a token without login)."""
    source = uri.pin_source
    if source is None:
        return None
    if source.startswith("env:"):
        name = source[4:]
        if name not in environ:
            raise TokenError(f"{uri.identity()}: the PIN variable {name} is not set")
        return environ[name]
    path = Path(source.removeprefix("file:"))
    try:
        lines = path.read_text("utf-8").splitlines()
    except OSError as e:
        raise TokenError(f"{uri.identity()}: cannot read the PIN file {path} ({e.strerror})") from None
    return lines[0] if lines else ""


def module_path(uri: Pkcs11Uri) -> str:
    if uri.module_path:
        return uri.module_path
    if P11_KIT_PROXY.exists():
        return str(P11_KIT_PROXY)
    raise TokenError(f"{uri.identity()}: no PKCS#11 module: add module-path=/path/to/module.so to the URI",
                     hint="or install p11-kit-modules so that the p11-kit proxy finds the token's module")
