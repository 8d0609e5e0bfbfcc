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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from reprobuild.errors import UsageError
from reprobuild.fileio import ReadRefused, read_bounded

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

