"""One binary package as a repository index describes it.

Relationship fields are kept as the raw strings of the index: parsing them is done once, lazily,
by the resolver's universe (``reprobuild.resolve``), so that loading a cached index stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BinaryPackage:
    name: str
    version: str
    architecture: str  # "amd64", "all", …
    source: str  # source package name (defaults to the binary name when the index omits Source)
    source_version: str  # the version in "Source: name (version)", else the binary version
    filename: str  # pool path relative to the archive root, e.g. "pool/main/d/dash/dash_0.5.12-2_amd64.deb"
    size: int
    sha256: str
    installed_size: int = 0  # KiB
    multi_arch: str = "no"  # no | same | foreign | allowed
    essential: bool = False
    protected: bool = False
    priority: str = "optional"
    section: str = ""
    depends: str = ""
    pre_depends: str = ""
    recommends: str = ""
    conflicts: str = ""
    breaks: str = ""
    provides: str = ""
    replaces: str = ""
    origin: str = ""  # id of the repository source (suite/component) this entry came from

    @property
    def key(self) -> str:
        """``name:arch`` — the identity dpkg uses for an installed package."""
        return f"{self.name}:{self.architecture}"

    @classmethod
    def from_stanza(cls, stanza: dict[str, str], origin: str = "") -> BinaryPackage:
        """Build from a deb822 Packages stanza (field names as in the index, case-sensitive)."""
        name = stanza["Package"]
        version = stanza["Version"]
        source_field = stanza.get("Source", "")
        if source_field:
            src, _, rest = source_field.partition(" ")
            source = src
            source_version = rest.strip().strip("()") or version
        else:
            source, source_version = name, version
        return cls(
            name=name,
            version=version,
            architecture=stanza.get("Architecture", "all"),
            source=source,
            source_version=source_version,
            filename=stanza.get("Filename", ""),
            size=int(stanza.get("Size", "0") or 0),
            sha256=stanza.get("SHA256", ""),
            installed_size=int(stanza.get("Installed-Size", "0") or 0),
            multi_arch=stanza.get("Multi-Arch", "no").lower(),
            essential=stanza.get("Essential", "no").lower() == "yes",
            protected=stanza.get("Protected", "no").lower() == "yes",
            priority=stanza.get("Priority", "optional").lower(),
            section=stanza.get("Section", ""),
            depends=stanza.get("Depends", ""),
            pre_depends=stanza.get("Pre-Depends", ""),
            recommends=stanza.get("Recommends", ""),
            conflicts=stanza.get("Conflicts", ""),
            breaks=stanza.get("Breaks", ""),
            provides=stanza.get("Provides", ""),
            replaces=stanza.get("Replaces", ""),
            origin=origin,
        )
