"""A small OCI registry client over ``requests`` (OCI Distribution Specification v1.1).

What it does: ``GET /v2/`` (the ping that finds the scheme and the authentication challenge),
blob ``HEAD``/``GET``, monolithic blob upload (``POST …/blobs/uploads/`` then ``PUT <location>?digest=``,
spec "Pushing a blob monolithically"), manifest ``PUT``/``GET``, and the referrers API
(``GET …/referrers/<digest>``). Every blob and manifest fetched is checked against its sha256
digest before it is used. Authentication: a ``401`` ping's ``WWW-Authenticate`` challenge is
answered once per client — ``Basic`` with the credentials, ``Bearer`` with a token fetched from the
challenge's ``realm`` for ``repository:<name>:pull[,push]`` (basic credentials sent to the realm
when there are any). TLS is verified against the system's CAs, ``REQUESTS_CA_BUNDLE`` or
``--ca-cert``; plain HTTP only for loopback registries or with ``insecure`` (which also accepts any
certificate). Errors are one-line :class:`RegistryError`\\ s naming the registry and what failed.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urljoin

import requests

from reprobuild.errors import ReprobuildError
from reprobuild.registry.auth import (
    Challenge,
    Credentials,
    RegistryAuthError,
    bearer_token,
    find_credentials,
    parse_challenge,
)
from reprobuild.registry.reference import Reference, parse_reference

T = TypeVar("T")
MAX_MANIFEST = 4 << 20  # the distribution spec lets registries refuse manifests over 4 MiB
MANIFEST_ACCEPT = ("application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
                   "application/vnd.docker.distribution.manifest.list.v2+json, "
                   "application/vnd.docker.distribution.manifest.v2+json")
_CHUNK = 1 << 20


class RegistryError(ReprobuildError):
    """A registry refused a request, could not be reached, or sent bytes that do not match."""


class TransientRegistryError(RegistryError):
    """A write the registry may accept when repeated: a 5xx, or DIGEST_INVALID, which Debian's
    docker-registry 2.8 answers when two clients write the same content at the same moment."""


RETRIES = 3


@dataclass(frozen=True)
class ClientOptions:
    insecure: bool = False
    ca_cert: Path | None = None
    credentials: Credentials | None = None
    timeout: float = 60.0
    push: bool = False  # ask for push access (the token scope)


@dataclass(frozen=True)
class Manifest:
    data: bytes
    media_type: str
    digest: str


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class RegistryClient:
    """One repository of one registry. Construct, then call; the first call pings the registry."""

    def __init__(self, ref: Reference, options: ClientOptions = ClientOptions(),
                 session: requests.Session | None = None) -> None:  # fmt: skip
        self.ref, self.options = ref, options
        self.session = session or requests.Session()
        self._base: str | None = None
        self._auth: str | None = None
        if options.ca_cert is not None and not options.ca_cert.is_file():
            raise RegistryError(f"--ca-cert {options.ca_cert}: no such file")

    # -- connection ---------------------------------------------------------------------------

    @property
    def _verify(self) -> bool | str | None:
        if self.options.ca_cert is not None:
            return str(self.options.ca_cert)
        return False if self.options.insecure else None  # None: requests' default or REQUESTS_CA_BUNDLE

    def _where(self) -> str:
        return f"registry {self.ref.registry}"

    def _connect(self) -> str:
        if self._base is not None:
            return self._base
        plain_allowed = self.ref.loopback or self.options.insecure
        try:
            response = self._send("GET", f"https://{self.ref.endpoint}/v2/")
        except requests.exceptions.SSLError as e:
            # A certificate that does not verify comes from a server that speaks TLS: no fallback.
            if not plain_allowed or "CERTIFICATE_VERIFY_FAILED" in str(e):
                raise RegistryError(
                    f"{self._where()}: TLS failed ({_short(e)})",
                    hint="plain HTTP is used only for loopback registries or with --insecure; "
                         "a private CA: --ca-cert FILE or REQUESTS_CA_BUNDLE") from e  # fmt: skip
            response = self._plain_ping(e)
        except requests.exceptions.ConnectionError as e:
            if not plain_allowed:
                raise RegistryError(f"{self._where()}: cannot connect ({_short(e)})") from e
            response = self._plain_ping(e)
        if response.status_code == 401:
            self._answer(response)
        elif response.status_code >= 400 and response.status_code != 404:
            self._fail(response, "ping")
        return self._base  # type: ignore[return-value]

    def _plain_ping(self, tls_error: Exception) -> requests.Response:
        try:
            return self._send("GET", f"http://{self.ref.endpoint}/v2/")
        except requests.exceptions.RequestException as e:
            raise RegistryError(f"{self._where()}: cannot connect over TLS ({_short(tls_error)}) "
                                f"nor plain HTTP ({_short(e)})") from e  # fmt: skip

    def _send(self, method: str, url: str, **kw: Any) -> requests.Response:
        response = self.session.request(method, url, timeout=self.options.timeout, verify=self._verify,
                                        allow_redirects=True, **kw)  # fmt: skip
        if self._base is None:
            self._base = url.split("/v2/", 1)[0]
        return response

    def _answer(self, response: requests.Response) -> None:
        challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        creds = self.options.credentials
        if challenge is None:
            self._fail(response, "ping")
        assert challenge is not None
        if challenge.scheme == "basic":
            if creds is None:
                raise RegistryError(f"{self._where()}: authentication required (401 Unauthorized) and no "
                                    "credentials found",
                                    hint="--username/--password-stdin, REGISTRY_AUTH_FILE or ~/.docker/config.json")
            self._auth = requests.auth._basic_auth_str(creds.username, creds.password)
        elif challenge.scheme == "bearer":
            self._auth = "Bearer " + self._token(challenge)
        else:
            raise RegistryError(f"{self._where()}: unsupported authentication scheme {challenge.scheme!r}")

    def _token(self, challenge: Challenge) -> str:
        actions = "pull,push" if self.options.push else "pull"
        try:
            return bearer_token(challenge, f"repository:{self.ref.repository}:{actions}", self.options.credentials,
                                self._verify, self.options.timeout)  # fmt: skip
        except RegistryAuthError as e:
            raise RegistryError(f"{self._where()}: {e.message}") from e

    def _request(self, method: str, path: str, what: str, ok: tuple[int, ...], **kw: Any) -> requests.Response:
        """``method`` on ``/v2/<repository>/<path>`` (or an absolute upload URL); a status not in
        ``ok`` is a RegistryError (404 is returned when in ``ok``)."""
        base = self._connect()
        url = path if path.startswith(("http://", "https://")) else f"{base}/v2/{self.ref.repository}/{path}"
        headers = dict(kw.pop("headers", {}))
        if self._auth:
            headers["Authorization"] = self._auth
        try:
            response = self._send(method, url, headers=headers, **kw)
        except requests.exceptions.RequestException as e:
            raise RegistryError(f"{self._where()}: {what}: {_short(e)}") from e
        if response.status_code not in ok:
            self._fail(response, what)
        return response

    def _fail(self, response: requests.Response, what: str) -> None:
        code = response.status_code
        detail = _registry_message(response)
        target = f"{self.ref.repository}"
        if code == 401:
            creds = self.options.credentials
            who = f" as {creds.username!r} ({creds.source})" if creds else " (no credentials found)"
            message = f"{what} {target}: authentication failed{who}: 401 Unauthorized"
        elif code == 403:
            message = f"{what} {target}: access denied: 403 Forbidden"
        elif code == 404:
            message = f"{what} {target}: not found: 404"
        elif code >= 500:
            message = f"{what} {target}: server error {code} {response.reason}"
        else:
            message = f"{what} {target}: HTTP {code} {response.reason}"
        error = TransientRegistryError if code >= 500 or detail.startswith("DIGEST_INVALID") else RegistryError
        raise error(f"{self._where()}: {message}" + (f" ({detail})" if detail else ""))

    def _retrying(self, write: Callable[[], T]) -> T:
        """``write`` again (up to :data:`RETRIES` times, 0.2 s, 0.4 s apart) on a transient error;
        every write reprobuild makes is idempotent (content-addressed blobs, manifests of equal bytes)."""
        for attempt in range(RETRIES):
            try:
                return write()
            except TransientRegistryError:
                if attempt == RETRIES - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    # -- blobs --------------------------------------------------------------------------------

    def blob_exists(self, digest: str) -> bool:
        r = self._request("HEAD", f"blobs/{digest}", f"HEAD blob {digest[:19]}…", (200, 404))
        return r.status_code == 200

    def push_blob(self, digest: str, size: int, data: bytes | None = None, path: Path | None = None,
                  stream: BinaryIO | None = None) -> bool:  # fmt: skip
        """Upload one blob (monolithic POST + PUT) unless the registry has it; True if uploaded."""
        start = stream.tell() if stream is not None else 0

        def attempt() -> bool:
            if stream is not None:
                stream.seek(start)
            return self._push_blob(digest, size, data, path, stream)

        return self._retrying(attempt)

    def _push_blob(self, digest: str, size: int, data: bytes | None, path: Path | None,
                   stream: BinaryIO | None) -> bool:  # fmt: skip
        if self.blob_exists(digest):
            return False
        r = self._request("POST", "blobs/uploads/", "start upload", (202,), headers={"Content-Length": "0"})
        location = r.headers.get("Location")
        if not location:
            raise RegistryError(f"{self._where()}: the upload start sent no Location")
        url = urljoin(r.url, location)
        url += ("&" if "?" in url else "?") + "digest=" + digest
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        what = f"upload blob {digest[:19]}…"
        if data is not None:
            self._request("PUT", url, what, (201,), headers=headers, data=data)
        elif path is not None:
            with open(path, "rb") as f:
                self._request("PUT", url, what, (201,), headers=headers, data=f)
        else:
            # A seekable file object (requests reads its length from it; a generator would be
            # sent chunked, which the spec's monolithic upload does not allow).
            assert stream is not None
            self._request("PUT", url, what, (201,), headers=headers, data=stream)
        return True

    def fetch_blob(self, digest: str, out: BinaryIO, max_size: int | None = None) -> int:
        """Write blob ``digest`` to ``out``; its sha256 must equal the digest. Returns the size."""
        r = self._request("GET", f"blobs/{digest}", f"GET blob {digest[:19]}…", (200,), stream=True)
        sha, size = hashlib.sha256(), 0
        with r:
            for chunk in r.iter_content(_CHUNK):
                size += len(chunk)
                if max_size is not None and size > max_size:
                    raise RegistryError(f"{self._where()}: blob {digest} is larger than {max_size} bytes")
                sha.update(chunk)
                out.write(chunk)
        got = "sha256:" + sha.hexdigest()
        if got != digest:
            raise RegistryError(f"{self._where()}: blob {digest} of {self.ref.repository} has sha256 {got[7:]}: "
                                "corrupt or tampered, refused")  # fmt: skip
        return size

    def get_blob_bytes(self, digest: str, max_size: int = MAX_MANIFEST) -> bytes:
        buf = io.BytesIO()
        self.fetch_blob(digest, buf, max_size)
        return buf.getvalue()

    # -- manifests ----------------------------------------------------------------------------

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> requests.Response:
        """PUT a manifest by tag or digest; the response's ``OCI-Subject`` header tells whether
        the registry processed a ``subject`` (referrers API)."""
        r = self._retrying(lambda: self._request("PUT", f"manifests/{reference}", f"push manifest {reference}",
                                                 (201,), headers={"Content-Type": media_type}, data=data))  # fmt: skip
        digest = sha256_digest(data)
        sent = r.headers.get("Docker-Content-Digest")
        if sent and sent != digest:
            raise RegistryError(f"{self._where()}: the registry stored manifest {sent}, not {digest}")
        return r

    def get_manifest(self, reference: str, missing_ok: bool = False) -> Manifest | None:
        """GET a manifest by tag or digest. By digest its sha256 must match."""
        ok = (200, 404) if missing_ok else (200,)
        r = self._request("GET", f"manifests/{reference}", f"GET manifest {reference}", ok,
                          headers={"Accept": MANIFEST_ACCEPT}, stream=True)  # fmt: skip
        if r.status_code == 404:
            return None
        data = self._bounded(r, f"manifest {reference}")
        digest = sha256_digest(data)
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(f"{self._where()}: manifest {reference} has sha256 {digest[7:]}: corrupt or "
                                "tampered, refused")  # fmt: skip
        media_type = r.headers.get("Content-Type", "").split(";")[0].strip()
        return Manifest(data, media_type, digest)

    def referrers_api(self, digest: str) -> bytes | None:
        """The referrers API's index for ``digest``, or None if the registry has no such API
        (404: distribution spec "Listing Referrers" — then the fallback tag is read)."""
        r = self._request("GET", f"referrers/{digest}", f"GET referrers of {digest[:19]}…", (200, 404),
                          headers={"Accept": "application/vnd.oci.image.index.v1+json"}, stream=True)  # fmt: skip
        if r.status_code == 404:
            r.close()
            return None
        return self._bounded(r, f"referrers index of {digest}")

    def _bounded(self, r: requests.Response, what: str) -> bytes:
        """A JSON response's body, refused beyond :data:`MAX_MANIFEST` bytes (read no further)."""
        with r:
            data = bytearray()
            for chunk in r.iter_content(64 << 10):
                data += chunk
                if len(data) > MAX_MANIFEST:
                    raise RegistryError(f"{self._where()}: {what} is larger than {MAX_MANIFEST} bytes, refused")
        return bytes(data)


def open_client(reference: str, env: Mapping[str, str], *, insecure: bool = False, ca_cert: Path | None = None,
                username: str | None = None, password: str | None = None,
                push: bool = False) -> tuple[Reference, RegistryClient]:  # fmt: skip
    """Parse ``reference`` and make its client: credentials from the arguments, else
    REGISTRY_AUTH_FILE or ~/.docker/config.json; the CA from ``ca_cert``, else REQUESTS_CA_BUNDLE."""
    ref = parse_reference(reference)
    if (username is None) != (password is None):
        raise RegistryError("--username and --password-stdin go together")
    if username is not None and password is not None:
        creds: Credentials | None = Credentials(username, password, "--username")
    else:
        creds = find_credentials(ref.registry, env)
    return ref, RegistryClient(ref, ClientOptions(insecure=insecure, ca_cert=ca_cert, credentials=creds, push=push))


def _short(e: Exception) -> str:
    """The innermost reason of a requests exception, on one line."""
    text = str(e)
    for marker in ("Caused by ", "Failed to establish a new connection: ", "SSLError("):
        if marker in text:
            text = text.split(marker, 1)[1]
    text = " ".join(text.split())
    return text[:200].rstrip("')\"")


def _registry_message(response: requests.Response) -> str:
    """The first error message of a distribution-spec error body, if it has one."""
    try:
        doc = response.json()
        err = doc["errors"][0]
        return f"{err.get('code', '')}: {err.get('message', '')}".strip(": ")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return ""


__all__ = ["ClientOptions", "Manifest", "RegistryClient", "RegistryError", "open_client", "sha256_digest"]
