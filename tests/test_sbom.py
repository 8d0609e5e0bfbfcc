"""SBOMs from a lock, validated against the official SPDX 2.3 and CycloneDX 1.5 JSON schemas."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import jsonschema
import pytest
from referencing import Registry, Resource

from reprobuild.lockfile import load_lock
from reprobuild.sbom import copyright_licenses, dumps_sbom, make_sbom
from tests.test_verify import make_lock

SCHEMAS = Path(__file__).parent / "data" / "schemas"
MINIMAL_LOCK = Path(__file__).parent.parent / "lock" / "minimal" / "reprobuild.lock"

DEP5 = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: dash

Files: *
Copyright: 1989-1994 The Regents of the University of California
License: BSD-3-clause

Files: src/mksignames.c
License: GPL-2+

License: BSD-3-clause
 Redistribution and use ...
"""


def validator(fmt: str) -> jsonschema.Draft7Validator:
    name = "spdx-2.3.schema.json" if fmt == "spdx" else "bom-1.5.schema.json"
    registry = Registry().with_resources(
        (f"http://cyclonedx.org/schema/{n}", Resource.from_contents(json.loads((SCHEMAS / n).read_text())))
        for n in ("spdx.schema.json", "jsf-0.82.schema.json"))
    return jsonschema.Draft7Validator(json.loads((SCHEMAS / name).read_text()), registry=registry,
                                      format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


def errors(doc: dict, fmt: str) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator(fmt).iter_errors(doc)]


def make_tree(root: Path) -> Path:
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(
        "Package: dash\nStatus: install ok installed\nMaintainer: Debian Shell Team <team+shell@tracker.debian.org>\n"
        "Version: 1.0-1\nArchitecture: amd64\n\n"
        "Package: libc6\nStatus: install ok installed\nMaintainer: GNU Libc Maintainers <debian-glibc@lists.debian.org>\n"
        "Version: 1.0-1\nArchitecture: amd64\n")
    (root / "usr/share/doc/dash").mkdir(parents=True)
    (root / "usr/share/doc/dash/copyright").write_text(DEP5)
    (root / "usr/share/doc/libc6").mkdir(parents=True)
    (root / "usr/share/doc/libc6/copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\nFiles: *\n"
        "License: LGPL-2.1+ and SomethingOdd\n")
    (root / "usr/share/doc/base-files").mkdir(parents=True)
    (root / "usr/share/doc/base-files/copyright").write_text("This is free-form text under the GPL.\n")
    return root


@pytest.mark.parametrize("fmt", ["spdx", "cyclonedx"])
def test_minimal_lock_sbom_is_schema_valid(fmt: str) -> None:
    lock = load_lock(MINIMAL_LOCK)
    doc = make_sbom(lock, fmt)
    assert errors(doc, fmt) == []
    n = len(lock.package_set("image").packages)
    if fmt == "spdx":
        assert len(doc["packages"]) == n + 1
        contains = [r for r in doc["relationships"] if r["relationshipType"] == "CONTAINS"]
        assert len(contains) == n
        assert any(r["relationshipType"] == "DEPENDS_ON" for r in doc["relationships"])
    else:
        assert len(doc["components"]) == n


@pytest.mark.parametrize("fmt", ["spdx", "cyclonedx"])
def test_tree_facts_and_validity(tmp_path: Path, fmt: str) -> None:
    lock = make_lock()
    doc = make_sbom(lock, fmt, make_tree(tmp_path / "tree"), "image.raw", "ab" * 32)
    assert errors(doc, fmt) == []
    if fmt == "spdx":
        pkgs = {p["name"]: p for p in doc["packages"]}
        dash = pkgs["dash"]
        assert dash["licenseDeclared"] == "(BSD-3-Clause AND GPL-2.0-or-later)"
        assert dash["supplier"] == "Organization: Debian Shell Team (team+shell@tracker.debian.org)"
        assert dash["externalRefs"][0]["referenceLocator"] == "pkg:deb/debian/dash@1.0-1?arch=amd64"
        assert dash["checksums"] == [{"algorithm": "SHA256", "checksumValue": lock.package_set("image").by_name()["dash"].sha256}]
        assert "source package dash 1.0-1" in dash["sourceInfo"]
        assert pkgs["libc6"]["licenseDeclared"] == "(LGPL-2.1-or-later AND LicenseRef-SomethingOdd)"
        assert {x["licenseId"] for x in doc["hasExtractedLicensingInfos"]} == {"LicenseRef-SomethingOdd"}
        assert pkgs["base-files"]["licenseDeclared"] == "NOASSERTION"  # free-form: no guessing
        assert pkgs["image.raw"]["checksums"][0]["checksumValue"] == "ab" * 32
    else:
        comps = {c["name"]: c for c in doc["components"]}
        assert comps["dash"]["purl"] == "pkg:deb/debian/dash@1.0-1?arch=amd64"
        assert {"license": {"id": "GPL-2.0-or-later"}} in comps["dash"]["licenses"]
        assert {"license": {"name": "SomethingOdd"}} in comps["libc6"]["licenses"]
        assert "licenses" not in comps["base-files"]


def test_tar_tree_with_symlinked_doc_dir(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "usr/share/doc/libc6/copyright").unlink()
    (tree / "usr/share/doc/libc6").rmdir()
    (tree / "usr/share/doc/libc6").symlink_to("dash")
    tar = tmp_path / "image.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(tree, arcname=".")
    doc = make_sbom(make_lock(), "spdx", tar)
    pkgs = {p["name"]: p for p in doc["packages"]}
    assert pkgs["libc6"]["licenseDeclared"] == "(BSD-3-Clause AND GPL-2.0-or-later)"


def test_sbom_is_reproducible() -> None:
    lock = load_lock(MINIMAL_LOCK)
    for fmt in ("spdx", "cyclonedx"):
        assert dumps_sbom(make_sbom(lock, fmt)) == dumps_sbom(make_sbom(lock, fmt))
    doc = make_sbom(lock, "spdx")
    assert doc["creationInfo"]["created"].startswith("20")  # from SOURCE_DATE_EPOCH, not now


def test_schema_rejects_a_broken_document() -> None:
    doc = make_sbom(make_lock(), "spdx")
    del doc["packages"][1]["SPDXID"]
    assert errors(doc, "spdx")
    doc = make_sbom(make_lock(), "cyclonedx")
    doc["components"][0]["hashes"][0]["alg"] = "SHA-257"
    assert errors(doc, "cyclonedx")


def test_copyright_licenses() -> None:
    assert copyright_licenses(DEP5) == ("BSD-3-clause", "GPL-2+")
    assert copyright_licenses("GPL-2 applies.\nLicense: MIT\n") == ()


def test_cli_sbom(tmp_path: Path) -> None:
    from tests.test_verify import call_main

    out = tmp_path / "sbom.json"
    assert call_main(["sbom", "-C", str(MINIMAL_LOCK.parent), "--format", "cyclonedx", "-o", str(out)]) == 0
    assert errors(json.loads(out.read_text()), "cyclonedx") == []
