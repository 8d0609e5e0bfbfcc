"""Registry credentials the way users already keep them, and the ``WWW-Authenticate`` challenge.

Looked up in this order: ``--username``/``--password-stdin``; the file named by
``REGISTRY_AUTH_FILE`` (containers-auth.json(5), podman's and skopeo's); ``~/.docker/config.json``
(Docker's). In both files ``auths`` maps a registry (``host[:port]``, also written with
``https://`` or a path, as ``docker login`` writes Docker Hub's) to ``{"auth": base64("user:password")}``
or ``{"username": …, "password": …}``. Credential helpers (``credsStore``, ``credHelpers``) are
not run. The challenge syntax is RFC 7235 §4.1 with the ``Basic`` (RFC 7617) and ``Bearer``
(the distribution project's token authentication: ``realm``, ``service``, ``scope``) schemes.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import requests.auth

from reprobuild.errors import ReprobuildError, UsageError
from reprobuild.fileio import ReadRefused, read_bounded
from reprobuild.registry.reference import PREFIX, parse_reference

MAX_AUTH_FILE = 1 << 20
_PARAM = re.compile(r'([A-Za-z_]+)="((?:[^"\\]|\\.)*)"|([A-Za-z_]+)=([^,\s]+)')


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    source: str  # where they came from, for error messages

    def __repr__(self) -> str:  # never print the password
        return f"Credentials({self.username!r} from {self.source})"


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "bearer" (lowercase)
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """The first challenge of a ``WWW-Authenticate`` header, or None if there is none."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params: dict[str, str] = {}
    for m in _PARAM.finditer(rest):
        if m.group(1):
            params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", m.group(2))
        else:
            params[m.group(3).lower()] = m.group(4)
    return Challenge(scheme.lower(), params)


def _registry_key(key: str) -> str:
    key = key.removeprefix("https://").removeprefix("http://")
    key = key.split("/", 1)[0]
    return "docker.io" if key in ("index.docker.io", "registry-1.docker.io") else key


def credentials_from_auths(doc: object, registry: str, source: str) -> Credentials | None:
    """The entry of ``registry`` in an ``auths`` document (pure)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("auths"), dict):
        return None
    for key, entry in doc["auths"].items():
        if not isinstance(key, str) or _registry_key(key) != _registry_key(registry) or not isinstance(entry, dict):
            continue
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], entry["password"], source)
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, colon, password = base64.b64decode(entry["auth"], validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError) as e:
                raise UsageError(f"{source}: the auth entry of {key} is not base64 of user:password ({e})") from e
            if not colon:
                raise UsageError(f"{source}: the auth entry of {key} is not base64 of user:password")
            return Credentials(user, password, source)
    return None


def find_credentials(registry: str, env: Mapping[str, str], home: Path | None = None) -> Credentials | None:
    """Credentials for ``registry`` from REGISTRY_AUTH_FILE or ~/.docker/config.json, if any."""
    files: list[Path] = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    docker_config = env.get("DOCKER_CONFIG")
    if docker_config:
        files.append(Path(docker_config) / "config.json")
    elif home is not None or env.get("HOME"):
        files.append(Path(home or env["HOME"]) / ".docker" / "config.json")
    for path in files:
        if not path.exists():
            continue
        try:
            doc = json.loads(read_bounded(path, MAX_AUTH_FILE))
        except (OSError, ValueError, ReadRefused) as e:
            raise UsageError(f"{path}: unreadable registry credentials file ({e})") from e
        found = credentials_from_auths(doc, registry, str(path))
        if found is not None:
            return found
    return None



def bearer_token(challenge: Challenge, scope: str, credentials: Credentials | None, verify: bool | str | None,
                 timeout: float) -> str:  # fmt: skip
    """A token from the challenge's ``realm`` for ``scope`` (the distribution project's token
    authentication); basic credentials go to the realm when there are any, else the token is
    anonymous (public repositories). Raises RegistryAuthError."""
    realm = challenge.params.get("realm")
    if not realm:
        raise RegistryAuthError("Bearer challenge without a realm")
    params = {"scope": scope, **({"service": challenge.params["service"]} if "service" in challenge.params else {})}
    auth = (credentials.username, credentials.password) if credentials else None
    try:
        r = requests.get(realm, params=params, auth=auth, timeout=timeout, verify=verify)
    except requests.exceptions.RequestException as e:
        raise RegistryAuthError(f"token service {realm} unreachable ({type(e).__name__})") from e
    if r.status_code != 200:
        who = f" as {credentials.username!r} ({credentials.source})" if credentials else " (no credentials found)"
        raise RegistryAuthError(f"token from {realm}: authentication failed{who}: {r.status_code} {r.reason}",
                                status=r.status_code)  # fmt: skip
    try:
        doc = r.json()
        token = doc.get("token") or doc.get("access_token")
    except (ValueError, AttributeError):
        token = None
    if not isinstance(token, str) or not token:
        raise RegistryAuthError(f"the token service {realm} sent no token")
    return token


class RegistryAuthError(ReprobuildError):
    """A challenge could not be answered (no realm, token service down or refusing)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SubstituterAuth(requests.auth.AuthBase):
    """requests authentication for the blob GETs of ``oci://`` substituters: a ``401`` from one of
    their registries is answered once per registry — ``Basic`` with its credentials, ``Bearer``
    with a token for ``repository:<name>:pull`` (anonymous when there are no credentials) — and
    the request sent again; later requests carry the answer. Other hosts are left alone."""

    def __init__(self, credentials: Mapping[str, Credentials | None], timeout: float = 30.0) -> None:
        self.credentials = dict(credentials)  # endpoint host[:port] → credentials (None: none found)
        self.timeout = timeout
        self.answers: dict[str, str] = {}  # endpoint → Authorization header

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        host = urlsplit(r.url or "").netloc
        if host in self.credentials:
            if host in self.answers:
                r.headers["Authorization"] = self.answers[host]
            r.register_hook("response", self._on_response)
        return r

    def _on_response(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        request = response.request
        host = urlsplit(request.url or "").netloc
        challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if response.status_code != 401 or challenge is None or request.headers.get("Authorization"):
            return response
        creds = self.credentials.get(host)
        if challenge.scheme == "basic" and creds is not None:
            answer = requests.auth._basic_auth_str(creds.username, creds.password)
        elif challenge.scheme == "bearer":
            path = urlsplit(request.url or "").path
            repository = path.removeprefix("/v2/").split("/blobs/", 1)[0]
            try:
                answer = "Bearer " + bearer_token(challenge, f"repository:{repository}:pull", creds,
                                                  kwargs.get("verify"), self.timeout)  # fmt: skip
            except RegistryAuthError:
                return response  # the 401 stands; fetch reports it with the URL
        else:
            return response
        self.answers[host] = answer
        response.content  # noqa: B018 - read the small error body so the connection can be reused
        response.close()
        again = request.copy()
        again.headers["Authorization"] = answer
        assert response.connection is not None
        retried = response.connection.send(again, **kwargs)
        retried.history.append(response)
        retried.request = again
        return retried


def substituter_auth(substituters: Sequence[str], env: Mapping[str, str]) -> SubstituterAuth | None:
    """The authentication of the ``oci://`` substituters among ``substituters`` (None if none)."""
    credentials: dict[str, Credentials | None] = {}
    for base in substituters:
        if base.startswith(PREFIX):
            ref = parse_reference(base)
            credentials[ref.endpoint] = find_credentials(ref.registry, env)
    return SubstituterAuth(credentials) if credentials else None
