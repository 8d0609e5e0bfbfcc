"""RSA signing inside a PKCS#11 token, through python-pkcs11 (docs/architecture.md says why).

The key is named by a ``pkcs11:`` URI (:mod:`reprobuild.pkcs11uri`). The private key never leaves
the token: :class:`Pkcs11Signer` asks the token for ``CKM_SHA256_RSA_PKCS`` (RSA PKCS#1 v1.5 over
SHA-256), or, when the token lacks it, ``CKM_RSA_PKCS`` over the DER DigestInfo (RFC 8017 §9.2).
RSA PKCS#1 v1.5 is deterministic, so the token's signature is byte-identical to one made with the
same key as a file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from reprobuild.pkcs11uri import Pkcs11Uri, TokenError, module_path, parse_uri, read_pin

# DER of DigestInfo{sha256, NULL} without the digest: the prefix RFC 8017 §9.2 note 1 lists.
SHA256_DIGEST_INFO_PREFIX = bytes.fromhex("3031300d060960864801650304020105000420")


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
