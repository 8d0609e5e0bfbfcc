"""OCI references as podman, skopeo and ORAS users write them (pure).

``[oci://]registry[:port]/repository[:tag][@sha256:<hex>]`` — the grammar of the distribution
project's ``reference`` package: the first path component names the registry when it holds a
``.`` or a ``:`` or is ``localhost`` (reprobuild needs it named: there is no default registry);
the repository is lowercase components ``[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*`` joined by ``/``;
a tag is ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``; the digest is ``sha256:`` and 64 hex digits.
``docker.io`` is reached at ``registry-1.docker.io`` and one-component names get ``library/``,
as Docker does.

Plain HTTP is allowed only for registries on the loopback addresses (127.0.0.0/8, ::1,
``localhost``), as Docker allows it; anything else needs TLS unless ``--insecure`` is given.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from reprobuild.errors import UsageError

PREFIX = "oci://"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]{1,5})?")


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port] as written (IPv6 in brackets)
    repository: str
    tag: str | None = None
    digest: str | None = None  # "sha256:<hex>"

    @property
    def host(self) -> str:
        """The host without port and brackets."""
        if self.registry.startswith("["):
            return self.registry[1:self.registry.index("]")]
        return self.registry.rsplit(":", 1)[0] if ":" in self.registry else self.registry

    @property
    def endpoint(self) -> str:
        """host[:port] the HTTP requests go to."""
        return "registry-1.docker.io" if self.registry == "docker.io" else self.registry

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def looks_like_reference(text: str) -> bool:
    """Whether ``text`` is written as a reference (``oci://`` or registry/repository...)."""
    if text.startswith(PREFIX):
        return True
    try:
        parse_reference(text)
    except UsageError:
        return False
    return True


def substituter_blob_urls(base: str, sha256: str) -> tuple[str, ...]:
    """The URLs of blob ``sha256:<hex>`` in the substituter ``oci://registry[:port]/repository``
    (distribution spec ``GET /v2/<name>/blobs/<digest>``): HTTPS; for a loopback registry plain
    HTTP first, then HTTPS (a TLS registry answers the plain request at once with 400)."""
    ref = parse_reference(base)
    if ref.tag or ref.digest:
        raise UsageError(f"{base}: a substituter names a repository, without a tag or digest")
    path = f"{ref.endpoint}/v2/{ref.repository}/blobs/sha256:{sha256}"
    return (f"http://{path}", f"https://{path}") if ref.loopback else (f"https://{path}",)


def parse_reference(text: str) -> Reference:
    """Parse ``text``; a malformed reference is a one-line :class:`UsageError`."""
    original = text
    text = text.removeprefix(PREFIX)

    def bad(why: str) -> UsageError:
        return UsageError(f"{original!r} is not an OCI reference: {why}",
                          hint="write registry[:port]/repository[:tag][@sha256:<hex>], e.g. "
                               "127.0.0.1:5000/images/demo:1")  # fmt: skip

    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise bad(f"the digest {digest!r} is not sha256: and 64 lowercase hex digits")
    registry, slash, rest = text.partition("/")
    if not slash or not rest:
        raise bad("no repository after the registry")
    if not ("." in registry or ":" in registry or registry == "localhost"):
        raise bad(f"{registry!r} does not name a registry (host with a '.' or a port, or localhost)")
    if not _HOST.fullmatch(registry):
        raise bad(f"the registry {registry!r} is not host[:port]")
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise bad(f"the tag {tag!r} is not [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")
    if not _REPOSITORY.fullmatch(rest) or len(rest) > 255:
        raise bad(f"the repository {rest!r} is not lowercase components joined by '/'")
    if registry == "docker.io" and "/" not in rest:
        rest = "library/" + rest
    return Reference(registry, rest, tag, digest)
