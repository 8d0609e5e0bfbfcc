"""No surprises in the image: the manifest's ``added_files`` names every path reprobuild wrote,
changed or removed with the setting that caused it, and ``reprobuild verify --audit`` lists what
no package shipped, what differs from the package and what is missing — hermetic, with the
host-made base package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from fixtures.make_host_base import build_host_base
from reprobuild.audit import DPKG_DATABASE, UNEXPLAINED
from reprobuild.config import load_spec
from reprobuild.lockfile import load_lock, save_lock
from tests.check_fixture import make_definition
from tests.test_pipeline import validate_manifest

REPO = Path(__file__).resolve().parent.parent


def _reprobuild(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REPROBUILD_STORE": str(store)}
    env.pop("SOURCE_DATE_EPOCH", None)
    return subprocess.run([sys.executable, "-m", "reprobuild", *args], env=env, text=True, capture_output=True,
                          timeout=600, cwd=REPO, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fixture definition (with its leaking post-installation script) plus settings that
    write, change and remove files, built as a tar and as a directory."""
    work = tmp_path_factory.mktemp("audit")
    d = make_definition(work / "fx", "http://127.0.0.1:9/unused", leak=True, base_deb=build_host_base(work / "hb"))
    (d / "extra/etc/app").mkdir(parents=True)
    (d / "extra/etc/app/app.conf").write_text("answer=42\n")
    (d / "extra/etc/app/link").symlink_to("app.conf")
    (d / "extra/var/lib/systemd").mkdir(parents=True)
    (d / "extra/var/lib/systemd/random-seed").write_bytes(b"not random")  # normalisation removes it
    conf = (d / "reprobuild.conf").read_text()
    (d / "reprobuild.conf").write_text(conf + "\n[Content]\nExtraTrees=extra\nAutologin=yes\nRemoveFiles=/usr/bin/sleep\n"
                                       "MachineId=0123456789abcdef0123456789abcdef\n")  # fmt: skip
    spec = load_spec(d)
    save_lock(replace(load_lock(d / "reprobuild.lock"), config_digest=spec.digest(), config=spec.digest_input()),
              d / "reprobuild.lock")
    store = work / "fx/store"
    for fmt, out in (("tar", work / "out-tar"), ("directory", work / "out-dir")):
        r = _reprobuild(store, "build", "-C", str(d), "--locked", "--offline", "-f", fmt, "-o", str(out), "-q")
        assert r.returncode == 0, r.stderr[-3000:]
    return {"definition": d, "store": store, "tar": work / "out-tar/image.tar", "dir": work / "out-dir/image"}


def test_manifest_lists_what_reprobuild_wrote_and_why(built: dict[str, Path]) -> None:
    manifest = json.loads(built["tar"].with_name("image.tar.manifest.json").read_text())
    validate_manifest(manifest)
    added = {(a["path"], a["action"]): a["cause"] for a in manifest["added_files"]}
    assert added[("/etc/hostname", "written")] == "Hostname=fixture"
    assert added[("/etc/app/app.conf", "written")] == added[("/etc/app/link", "written")] == "ExtraTrees=extra"
    for unit in ("getty@.service.d", "serial-getty@.service.d", "console-getty.service.d"):
        assert added[(f"/etc/systemd/system/{unit}/autologin.conf", "written")] == "Autologin=yes"
    assert added[("/etc/machine-id", "written")] == "MachineId=0123456789abcdef0123456789abcdef"
    assert added[("/usr/bin/sleep", "removed")] == "RemoveFiles=/usr/bin/sleep"
    assert added[("/etc/fstab", "written")].startswith("package installation: a placeholder")
    assert added[("/var/lib/systemd/random-seed", "written")] == "ExtraTrees=extra"
    assert added[("/var/lib/systemd/random-seed", "removed")].startswith("normalisation: random bytes")
    directory = json.loads(built["dir"].with_name("image.manifest.json").read_text())
    assert directory["added_files"] == manifest["added_files"]  # the same list whatever the format


def _audit(built: dict[str, Path], image: Path, *extra: str) -> dict:
    r = _reprobuild(built["store"], "verify", "--audit", str(image), "--lock", str(built["definition"] / "reprobuild.lock"),
                    "--json", *extra)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_audit_names_files_from_no_package_with_their_cause(built: dict[str, Path]) -> None:
    report = _audit(built, built["tar"])
    assert report["packages"] == 1 and report["package_files"] > 20
    unowned = {f["path"]: f["detail"] for f in report["not_from_packages"]}
    assert unowned["/etc/hostname"] == "Hostname=fixture (written)"
    assert unowned["/etc/app/app.conf"] == "ExtraTrees=extra (written)"
    assert unowned["/etc/leaked-build-path"] == UNEXPLAINED  # the post-installation script's doing
    assert unowned["/var/lib/dpkg/status"].startswith("package installation: dpkg's database, started empty")
    assert unowned["/var/lib/dpkg/info/hostbase.list"] == DPKG_DATABASE
    assert "/usr/bin/cat" not in unowned and "/bin/cat" not in unowned  # merged /usr resolved
    missing = {f["path"]: f["detail"] for f in report["missing"]}
    assert missing == {"/usr/bin/sleep": "from hostbase: RemoveFiles=/usr/bin/sleep"}
    assert report["changed"] == []


def test_audit_finds_a_changed_package_file(built: dict[str, Path], tmp_path: Path) -> None:
    tree = built["dir"]
    target = tree / "usr/bin/true"
    original = target.read_bytes()
    try:
        target.write_bytes(original + b"\0surprise")
        os.unlink(tree / "usr/bin/false")
        report = _audit(built, tree)
    finally:
        target.write_bytes(original)
    changed = {f["path"]: f["detail"] for f in report["changed"]}
    assert list(changed) == ["/usr/bin/true"] and changed["/usr/bin/true"].startswith("content differs from hostbase")
    missing = {f["path"]: f["detail"] for f in report["missing"]}
    assert missing["/usr/bin/false"] == "from hostbase: not in the image, and the manifest records no removal"


def test_audit_text_and_errors(built: dict[str, Path], tmp_path: Path) -> None:
    lock = str(built["definition"] / "reprobuild.lock")
    r = _reprobuild(built["store"], "verify", "--audit", str(built["tar"]), "--lock", lock)
    assert r.returncode == 0, r.stderr
    assert "not from any package" in r.stdout and "/etc/leaked-build-path" in r.stdout
    assert "files of dpkg's database (written by dpkg) under /var/lib/dpkg" in r.stdout
    r = _reprobuild(tmp_path / "empty-store", "verify", "--audit", str(built["tar"]), "--lock", lock)
    assert r.returncode == 1 and "not in the store" in r.stderr and "reprobuild fetch" in r.stderr
    junk = tmp_path / "junk.raw"
    junk.write_bytes(b"x" * 4096)
    r = _reprobuild(built["store"], "verify", "--audit", str(junk), "--lock", lock)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "not a Discoverable Disk Image" in r.stderr
