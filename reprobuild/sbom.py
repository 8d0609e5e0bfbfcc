"""Software bills of materials from a lock: SPDX 2.3 JSON and CycloneDX 1.5 JSON.

Every package of the lock's ``image`` set becomes one SBOM package/component with its name,
version, architecture, source package, purl (``pkg:deb/debian/NAME@VERSION?arch=ARCH``), the
.deb's sha256, and, when a built tree is given (a ``directory`` output or an ``image.tar``):
the supplier from dpkg's ``Maintainer:`` field and the licences that the package's machine-readable
``/usr/share/doc/PKG/copyright`` file (DEP-5) names. Relationships: the document describes the
image, the image contains every package, and each package depends on the packages its locked
Depends/Pre-Depends chose. With a ``build`` set (``BuildPackages=``), its packages that are not in
the image are listed too, as build dependencies of the image (SPDX ``BUILD_DEPENDENCY_OF``;
CycloneDX ``scope: excluded`` with the property ``reprobuild:package-set=build``).

Reproducibility: no clocks. The creation time is the lock's ``SOURCE_DATE_EPOCH`` and the
document namespace / serial number derive from the lock digest, so the same lock (and tree) gives
the same bytes.
"""

from __future__ import annotations

import datetime
import json
import re
import tarfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprobuild import __version__
from reprobuild.errors import UsageError
from reprobuild.lockfile import Lock, LockedPackage, lock_digest
from reprobuild.provenance import purl

FORMATS = ("spdx", "cyclonedx")

# Debian copyright-format short names → SPDX license identifiers (DEP-5 §"License short name";
# the SPDX list). Names not here are kept as LicenseRef-… (SPDX) or a license name (CycloneDX).
DEBIAN_TO_SPDX = {
    "GPL-1": "GPL-1.0-only", "GPL-1+": "GPL-1.0-or-later", "GPL-2": "GPL-2.0-only", "GPL-2+": "GPL-2.0-or-later",
    "GPL-3": "GPL-3.0-only", "GPL-3+": "GPL-3.0-or-later", "LGPL-2": "LGPL-2.0-only", "LGPL-2+": "LGPL-2.0-or-later",
    "LGPL-2.1": "LGPL-2.1-only", "LGPL-2.1+": "LGPL-2.1-or-later", "LGPL-3": "LGPL-3.0-only",
    "LGPL-3+": "LGPL-3.0-or-later", "AGPL-3": "AGPL-3.0-only", "AGPL-3+": "AGPL-3.0-or-later",
    "GFDL-1.2": "GFDL-1.2-only", "GFDL-1.2+": "GFDL-1.2-or-later", "GFDL-1.3": "GFDL-1.3-only",
    "GFDL-1.3+": "GFDL-1.3-or-later", "Apache-2.0": "Apache-2.0", "Apache-2": "Apache-2.0",
    "Artistic": "Artistic-1.0-Perl", "Artistic-2.0": "Artistic-2.0", "BSD-2-clause": "BSD-2-Clause",
    "BSD-3-clause": "BSD-3-Clause", "BSD-4-clause": "BSD-4-Clause", "ISC": "ISC", "MIT": "MIT", "Expat": "MIT",
    "MPL-1.1": "MPL-1.1", "MPL-2.0": "MPL-2.0", "Zlib": "Zlib", "zlib": "Zlib", "CC0-1.0": "CC0-1.0",
    "CC0": "CC0-1.0", "public-domain": None, "X11": "X11", "PSF-2": "PSF-2.0", "Python-2.0": "Python-2.0",
    "OpenSSL": "OpenSSL", "BSL-1.0": "BSL-1.0", "Unicode-DFS-2016": "Unicode-DFS-2016", "curl": "curl",
    "FSFAP": "FSFAP", "FSFUL": "FSFUL", "FSFULLR": "FSFULLR", "Unlicense": "Unlicense", "WTFPL": "WTFPL",
    "bzip2-1.0.6": "bzip2-1.0.6", "Sleepycat": "Sleepycat", "SSLeay": "SSLeay", "OLDAP-2.8": "OLDAP-2.8",
}  # fmt: skip

_SPDX_ID_CHARS = re.compile(r"[^A-Za-z0-9.-]")
_LICENSE_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]*")


@dataclass(frozen=True)
class PackageFacts:
    """What the built tree tells about one package (None: unknown)."""

    supplier: str | None = None  # dpkg Maintainer field
    licenses: tuple[str, ...] = ()  # Debian short names from its copyright file, sorted


# -- reading a built tree ------------------------------------------------------------------------


def _dir_reader(tree: Path) -> Callable[[str], bytes | None]:
    root = tree.resolve()

    def read(rel: str) -> bytes | None:
        p = (root / rel).resolve()  # symlinks followed, but never out of the tree
        if root not in p.parents or not p.is_file():
            return None
        return p.read_bytes()

    return read


def _tar_reader(tf: tarfile.TarFile) -> Callable[[str], bytes | None]:
    members = {m.name.removeprefix("./").rstrip("/"): m for m in tf.getmembers()}

    def resolve(rel: str) -> str | None:
        """Follow symlinks in every component (usr/share/doc/PKG is often a link), bounded."""
        parts = _normpath(rel).split("/")
        i, hops = 0, 0
        while i < len(parts):
            prefix = "/".join(parts[: i + 1])
            m = members.get(prefix)
            if m is not None and m.issym():
                hops += 1
                if hops > 32:
                    return None
                parent = "/".join(parts[:i])
                target = m.linkname if m.linkname.startswith("/") else f"{parent}/{m.linkname}"
                parts = _normpath(target + "/" + "/".join(parts[i + 1:])).split("/")
                i = 0
                continue
            i += 1
        return "/".join(parts)

    def read(rel: str) -> bytes | None:
        name = resolve(rel)
        m = members.get(name) if name is not None else None
        if m is None or not m.isfile():
            return None
        f = tf.extractfile(m)
        return f.read() if f else None

    return read


def _normpath(rel: str) -> str:
    parts: list[str] = []
    for part in rel.lstrip("/").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def copyright_licenses(text: str) -> tuple[str, ...]:
    """Licence short names a DEP-5 copyright file names in its ``License:`` fields (sorted).

    Returns () for a free-form (not machine-readable) file: guessing from prose would be wrong."""
    if not re.match(r"Format:\s*\S*(copyright-format|dep5|DEP-5)", text, re.IGNORECASE):
        return ()
    names: set[str] = set()
    for m in re.finditer(r"^License:[ \t]*(.+)$", text, re.MULTILINE):
        for word in _LICENSE_WORD.findall(m.group(1)):
            if word.lower() not in ("or", "and", "with", "exception"):
                names.add(word)
    return tuple(sorted(names))


def read_tree_facts(tree: Path, lock: Lock) -> dict[str, PackageFacts]:
    """Supplier and licences of every locked package, from a built directory or tar output."""
    if tree.is_dir():
        return _facts(_dir_reader(tree), lock)
    if tree.is_file() and tarfile.is_tarfile(tree):
        with tarfile.open(tree) as tf:
            return _facts(_tar_reader(tf), lock)
    raise UsageError(f"{tree}: not a directory or tar output to read licences from")


def _facts(read: Callable[[str], bytes | None], lock: Lock) -> dict[str, PackageFacts]:
    from reprobuild.debian.control import iter_stanzas

    maintainers: dict[str, str] = {}
    status = read("var/lib/dpkg/status")
    if status is not None:
        for stanza in iter_stanzas(status.decode("utf-8", "replace")):
            if "Package" in stanza and "Maintainer" in stanza:
                maintainers[stanza["Package"]] = stanza["Maintainer"]
    facts = {}
    for p in lock.package_set("image").packages:
        text = read(f"usr/share/doc/{p.name}/copyright")
        licenses = copyright_licenses(text.decode("utf-8", "replace")) if text else ()
        facts[p.name] = PackageFacts(maintainers.get(p.name), licenses)
    return facts


# -- shared pieces -------------------------------------------------------------------------------


def build_only_packages(lock: Lock) -> list[LockedPackage]:
    """The lock's ``build`` set minus the image's packages (empty without a build set)."""
    if not lock.has_set("build"):
        return []
    image = lock.package_set("image").by_name()
    return [p for p in lock.package_set("build").packages if p.name not in image]


def _created(lock: Lock) -> str:
    # SOURCE_DATE_EPOCH, never the wall clock: the SBOM of a lock is reproducible.
    return datetime.datetime.fromtimestamp(lock.source_date_epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _lock_hex(lock: Lock) -> str:
    return lock_digest(lock).removeprefix("sha256:")


def _spdx_id(p: LockedPackage) -> str:
    return "SPDXRef-Package-" + _SPDX_ID_CHARS.sub("-", f"{p.name}-{p.architecture}")


def _supplier(maintainer: str | None) -> str:
    if not maintainer:
        return "NOASSERTION"
    m = re.match(r"\s*(.*?)\s*<([^>]*)>", maintainer)
    name, email = (m.group(1), m.group(2)) if m else (maintainer.strip(), "")
    kind = "Organization" if re.search(r"team|maintainers|project|debian", name, re.IGNORECASE) else "Person"
    return f"{kind}: {name}" + (f" ({email})" if email else "")


def _spdx_license(names: tuple[str, ...], refs: dict[str, str]) -> str:
    if not names:
        return "NOASSERTION"
    ids = []
    for n in names:
        spdx = DEBIAN_TO_SPDX.get(n)
        if spdx is None:
            spdx = "LicenseRef-" + _SPDX_ID_CHARS.sub("-", n)
            refs[spdx] = n
        ids.append(spdx)
    ids = sorted(set(ids))
    # A copyright file with several License: fields covers different files with each: all apply.
    return ids[0] if len(ids) == 1 else "(" + " AND ".join(ids) + ")"


# -- SPDX 2.3 ------------------------------------------------------------------------------------


def spdx_document(lock: Lock, facts: dict[str, PackageFacts] | None = None, image_name: str = "image",
                  image_sha256: str | None = None) -> dict[str, Any]:  # fmt: skip
    """An SPDX 2.3 document (JSON data) for the lock's image set. Pure."""
    facts = facts or {}
    digest = _lock_hex(lock)
    refs: dict[str, str] = {}
    image_pkg: dict[str, Any] = {
        "SPDXID": "SPDXRef-Image", "name": image_name, "versionInfo": digest[:16],
        "downloadLocation": "NOASSERTION", "filesAnalyzed": False, "primaryPackagePurpose": "OPERATING_SYSTEM",
        "licenseConcluded": "NOASSERTION", "licenseDeclared": "NOASSERTION", "copyrightText": "NOASSERTION",
        "comment": f"{lock.distribution} {lock.release} {lock.architecture} image built from lock sha256:{digest}",
    }  # fmt: skip
    if image_sha256:
        image_pkg["checksums"] = [{"algorithm": "SHA256", "checksumValue": image_sha256}]
    packages = [image_pkg]
    relationships = [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                      "relatedSpdxElement": "SPDXRef-Image"}]  # fmt: skip
    image_set = lock.package_set("image")
    by_name = image_set.by_name()
    for p in image_set.packages:
        packages.append(_spdx_package(p, facts.get(p.name, PackageFacts()), refs))
        relationships.append({"spdxElementId": "SPDXRef-Image", "relationshipType": "CONTAINS",
                              "relatedSpdxElement": _spdx_id(p)})  # fmt: skip
        for dep in sorted(set(p.depends + p.pre_depends)):
            if dep in by_name:
                relationships.append({"spdxElementId": _spdx_id(p), "relationshipType": "DEPENDS_ON",
                                      "relatedSpdxElement": _spdx_id(by_name[dep])})  # fmt: skip
    for p in build_only_packages(lock):
        # In the build environment (BuildPackages=), not in the image: what the image's own
        # software was compiled with.
        entry = _spdx_package(p, PackageFacts(), refs)
        entry["comment"] = "build set only (BuildPackages=): used to build the image's software, not installed in it"
        packages.append(entry)
        relationships.append({"spdxElementId": _spdx_id(p), "relationshipType": "BUILD_DEPENDENCY_OF",
                              "relatedSpdxElement": "SPDXRef-Image"})  # fmt: skip
    doc: dict[str, Any] = {
        "spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{image_name} ({lock.distribution} {lock.release} {lock.architecture})",
        # A URI unique to this lock, derived from it (no random UUID: the document is reproducible).
        "documentNamespace": f"urn:reprobuild:spdx:{digest}",
        "creationInfo": {"created": _created(lock), "creators": [f"Tool: reprobuild-{__version__}"]},
        "packages": packages, "relationships": relationships,
    }  # fmt: skip
    if refs:
        doc["hasExtractedLicensingInfos"] = [
            {"licenseId": ref, "name": name,
             "extractedText": f"The Debian copyright file names the licence {name!r}; see its full text there."}
            for ref, name in sorted(refs.items())]  # fmt: skip
    return doc


def _spdx_package(p: LockedPackage, f: PackageFacts, refs: dict[str, str]) -> dict[str, Any]:
    return {
        "SPDXID": _spdx_id(p), "name": p.name, "versionInfo": p.version,
        "supplier": _supplier(f.supplier),
        "downloadLocation": p.urls[0] if p.urls else "NOASSERTION",
        "filesAnalyzed": False, "packageFileName": p.filename,
        "checksums": [{"algorithm": "SHA256", "checksumValue": p.sha256}],
        "sourceInfo": f"built from Debian source package {p.source_package} {p.source_version}",
        "licenseConcluded": "NOASSERTION", "licenseDeclared": _spdx_license(f.licenses, refs),
        "copyrightText": "NOASSERTION",
        "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                          "referenceLocator": purl(p.name, p.version, p.architecture)}],
        "attributionTexts": [f"architecture: {p.architecture}"],
    }  # fmt: skip


# -- CycloneDX 1.5 -------------------------------------------------------------------------------


def _cdx_licenses(names: tuple[str, ...]) -> list[dict[str, Any]]:
    out = []
    for n in names:
        spdx = DEBIAN_TO_SPDX.get(n)
        out.append({"license": {"id": spdx} if spdx else {"name": n}})
    seen, unique = set(), []
    for item in out:
        key = json.dumps(item, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique


def cyclonedx_document(lock: Lock, facts: dict[str, PackageFacts] | None = None, image_name: str = "image",
                       image_sha256: str | None = None) -> dict[str, Any]:  # fmt: skip
    """A CycloneDX 1.5 BOM (JSON data) for the lock's image set. Pure."""
    facts = facts or {}
    digest = _lock_hex(lock)
    image_set = lock.package_set("image")
    by_name = image_set.by_name()
    image_ref = f"image@{digest[:16]}"
    image_component: dict[str, Any] = {"type": "operating-system", "bom-ref": image_ref, "name": image_name,
                                       "version": digest[:16]}  # fmt: skip
    if image_sha256:
        image_component["hashes"] = [{"alg": "SHA-256", "content": image_sha256}]
    components = []
    dependencies = [{"ref": image_ref, "dependsOn": [purl(p.name, p.version, p.architecture)
                                                     for p in image_set.packages]}]  # fmt: skip
    for p in image_set.packages:
        f = facts.get(p.name, PackageFacts())
        ref = purl(p.name, p.version, p.architecture)
        c: dict[str, Any] = {
            "type": "library" if p.name.startswith("lib") else "application",
            "bom-ref": ref, "name": p.name, "version": p.version, "purl": ref,
            "hashes": [{"alg": "SHA-256", "content": p.sha256}],
            "properties": [{"name": "deb:architecture", "value": p.architecture},
                           {"name": "deb:source", "value": p.source_package},
                           {"name": "deb:source-version", "value": p.source_version}],
        }  # fmt: skip
        if f.supplier:
            c["supplier"] = {"name": f.supplier}
        if f.licenses:
            c["licenses"] = _cdx_licenses(f.licenses)
        components.append(c)
        deps = sorted({purl(by_name[d].name, by_name[d].version, by_name[d].architecture)
                       for d in p.depends + p.pre_depends if d in by_name})  # fmt: skip
        dependencies.append({"ref": ref, "dependsOn": deps})
    for p in build_only_packages(lock):
        ref = purl(p.name, p.version, p.architecture)
        components.append({
            "type": "library" if p.name.startswith("lib") else "application",
            "bom-ref": ref, "name": p.name, "version": p.version, "purl": ref,
            # Not in the image: only in the environment its software was built in.
            "scope": "excluded",
            "hashes": [{"alg": "SHA-256", "content": p.sha256}],
            "properties": [{"name": "deb:architecture", "value": p.architecture},
                           {"name": "deb:source", "value": p.source_package},
                           {"name": "deb:source-version", "value": p.source_version},
                           {"name": "reprobuild:package-set", "value": "build"}],
        })  # fmt: skip
    return {
        "bomFormat": "CycloneDX", "specVersion": "1.5",
        # RFC 4122 URN derived from the lock digest (name-based UUIDv5): reproducible.
        "serialNumber": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, 'urn:reprobuild:lock:' + digest)}",
        "version": 1,
        "metadata": {"timestamp": _created(lock),
                     "tools": {"components": [{"type": "application", "name": "reprobuild", "version": __version__}]},
                     "component": image_component},
        "components": components, "dependencies": dependencies,
    }  # fmt: skip


def make_sbom(lock: Lock, fmt: str = "spdx", tree: Path | None = None, image_name: str = "image",
              image_sha256: str | None = None) -> dict[str, Any]:  # fmt: skip
    """The SBOM of ``lock`` in ``fmt``; ``tree`` (directory or tar output) adds suppliers and licences."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown SBOM format {fmt!r} (known: {', '.join(FORMATS)})")
    facts = read_tree_facts(tree, lock) if tree is not None else None
    make = spdx_document if fmt == "spdx" else cyclonedx_document
    return make(lock, facts, image_name, image_sha256)


def dumps_sbom(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


