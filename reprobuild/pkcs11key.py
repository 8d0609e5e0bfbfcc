"""RSA signing keys in PKCS#11 tokens: ``pkcs11:`` URIs (RFC 7512), PIN sources, signing in the token.

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

The private key never leaves the token: :class:`Pkcs11Signer` asks the token for
``CKM_SHA256_RSA_PKCS`` (RSA PKCS#1 v1.5 over SHA-256), or, when the token lacks it,
``CKM_RSA_PKCS`` over the DER DigestInfo (RFC 8017 §9.2). RSA PKCS#1 v1.5 is deterministic,
so the token's signature is byte-identical to one made with the same key as a file.

The token is reached through python-pkcs11 (docs/architecture.md says why).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote_to_bytes

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from reprobuild.errors import ReprobuildError

SCHEME = "pkcs11:"
PATH_ATTRIBUTES = ("token", "object", "id", "type", "manufacturer", "serial", "model")
QUERY_ATTRIBUTES = ("module-path", "pin-source")
# Where Debian's p11-kit-modules puts the proxy that reaches every module p11-kit knows of.
P11_KIT_PROXY = Path("/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so")
# DER of DigestInfo{sha256, NULL} without the digest: the prefix RFC 8017 §9.2 note 1 lists.
SHA256_DIGEST_INFO_PREFIX = bytes.fromhex("3031300d060960864801650304020105000420")


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


@dataclass(frozen=True)
class Pkcs11Signer:
    """An RSA key in a token plus its certificate (a file: certificates are public)."""

    uri: Pkcs11Uri
    certificate: x509.Certificate
    environ: Mapping[str, str] = field(repr=False)  # may hold the PIN variable: never printed
    # False: always CKM_RSA_PKCS over the DigestInfo (what a token without CKM_SHA256_RSA_PKCS gets).
    hash_in_token: bool = True

    @property
    def description(self) -> str:
        return self.uri.identity()

    @property
    def identity(self) -> str:
        """Certificate and key URI (never the PIN): what a cache key needs to know of this key."""
        der = self.certificate.public_bytes(Encoding.DER)
        return hashlib.sha256(der + b"\0" + self.uri.identity().encode()).hexdigest()

    def check(self) -> None:
        """Log in once and check that the token's key is the certificate's (modulus and exponent)."""
        public = self.certificate.public_key()
        if not isinstance(public, rsa.RSAPublicKey):
            raise TokenError(f"{self.description}: the certificate's key is not RSA")

        def compare(key: pkcs11.PrivateKey) -> None:
            numbers = public.public_numbers()
            modulus = int.from_bytes(key[pkcs11.Attribute.MODULUS], "big")
            if modulus != numbers.n:
                raise TokenError(f"{self.description} is not the key of the certificate "
                                 f"(CN {_common_name(self.certificate)})")  # fmt: skip

        self._with_key(compare)

    def sign(self, data: bytes) -> bytes:
        """RSA PKCS#1 v1.5 with SHA-256 over ``data``, computed in the token."""
        def sign(key: pkcs11.PrivateKey) -> bytes:
            mechanisms = key.session.token.slot.get_mechanisms()
            if self.hash_in_token and pkcs11.Mechanism.SHA256_RSA_PKCS in mechanisms:
                return bytes(key.sign(data, mechanism=pkcs11.Mechanism.SHA256_RSA_PKCS))
            digest_info = SHA256_DIGEST_INFO_PREFIX + hashlib.sha256(data).digest()
            return bytes(key.sign(digest_info, mechanism=pkcs11.Mechanism.RSA_PKCS))

        return self._with_key(sign)

    def _with_key(self, action):
        pin = read_pin(self.uri, self.environ)
        so = module_path(self.uri)
        name = self.description
        try:
            lib = pkcs11.lib(so)
        except (OSError, RuntimeError, pkcs11.PKCS11Error) as e:
            raise TokenError(f"{name}: cannot load the PKCS#11 module {so} ({type(e).__name__})") from None
        try:
            selector = {k: v for k, v in (("token_label", self.uri.text("token")),
                                          ("token_serial", self.uri.get("serial")),
                                          ("manufacturer_id", self.uri.text("manufacturer")),
                                          ("model", self.uri.text("model"))) if v is not None}  # fmt: skip
            try:
                token = lib.get_token(**selector)
            except pkcs11.NoSuchToken:
                raise TokenError(f"{name}: no such token in {so}") from None
            except pkcs11.MultipleTokensReturned:
                raise TokenError(f"{name}: several tokens match; name one by serial=") from None
            try:
                with token.open(user_pin=pin) as session:
                    query = {k: v for k, v in (("label", self.uri.text("object")), ("id", self.uri.get("id")))
                             if v is not None}  # fmt: skip
                    try:
                        key = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY,
                                              key_type=pkcs11.KeyType.RSA, **query)  # fmt: skip
                    except pkcs11.NoSuchKey:
                        raise TokenError(f"{name}: the token has no RSA private key with these attributes") from None
                    except pkcs11.MultipleObjectsReturned:
                        raise TokenError(f"{name}: several keys match; name one by id=") from None
                    return action(key)
            except pkcs11.PinIncorrect:
                raise TokenError(f"{name}: the token refused the PIN (wrong PIN)") from None
            except pkcs11.PinLocked:
                raise TokenError(f"{name}: the token's PIN is locked") from None
            except pkcs11.UserNotLoggedIn:
                raise TokenError(f"{name}: the token needs a login: add pin-source=file:PATH or env:NAME") from None
            except pkcs11.PKCS11Error as e:
                raise TokenError(f"{name}: the token failed ({type(e).__name__})") from None
        finally:
            # Finalize, so that the next use reads the module's configuration afresh.
            try:
                lib.finalize()
            except pkcs11.PKCS11Error:
                pass


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else "?"


def open_pkcs11_signer(text: str, certificate: x509.Certificate, environ: Mapping[str, str]) -> Pkcs11Signer:
    """A signer for the key named by ``text``, checked against ``certificate`` (one token login)."""
    try:
        uri = parse_uri(text)
    except ValueError as e:
        raise TokenError(f"{text.split('?')[0]}: {e}") from None
    signer = Pkcs11Signer(uri, certificate, dict(environ))
    signer.check()
    return signer
