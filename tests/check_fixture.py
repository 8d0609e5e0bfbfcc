"""A tiny image definition built hermetically from the host-made base package, for `reprobuild check`.

``make_definition(workdir, url_base, leak=True)`` writes ``workdir/def`` (``reprobuild.conf``, a
lock whose one package is ``hostbase`` from ``fixtures/make_host_base.py``, and with ``leak`` a
post-installation script) and ``workdir/store`` (holding the package), and copies the package to
``workdir/served/`` for a local HTTP server at ``url_base`` (the lock's URL, for cold-store builds).

The leak is deliberate and of the kind the check exists to catch: the script reads the host path
of its own bind mount from /proc/self/mountinfo (the "root" field of the mount at
/run/reprobuild/script), which is inside the definition directory, and writes it into
/etc/leaked-build-path. Moving the definition (the build-path variation) changes the image.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fixtures.make_host_base import build_host_base
from reprobuild.config import load_spec
from reprobuild.debian.deb import read_control
from reprobuild.lockfile import Lock, LockedPackage, LockSource, PackageSet, save_lock
from reprobuild.store import Store

EPOCH = 1735689600
LEAK_SCRIPT = """#!/bin/sh
# A deliberate reproducibility bug: record where on the host this script lives.
while read -r id parent dev root mnt rest; do
  if [ "$mnt" = /run/reprobuild/script ]; then echo "$root" > /etc/leaked-build-path; fi
done < /proc/self/mountinfo
exit 0
"""


def make_definition(workdir: Path, url_base: str, leak: bool = True, base_deb: Path | None = None) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    deb = base_deb or build_host_base(workdir)
    served = workdir / "served"
    served.mkdir(exist_ok=True)
    shutil.copy2(deb, served / deb.name)
    store = Store(workdir / "store")
    sha = store.put_file(deb)
    control = read_control(deb)
    definition = workdir / "def"
    definition.mkdir()
    conf = "[Distribution]\nRelease=trixie\n\n[Content]\nHostname=fixture\n"
    if leak:
        script = definition / "leak.sh"
        script.write_text(LEAK_SCRIPT)
        script.chmod(0o755)
        conf += "PostInstallationScripts=leak.sh\n"
    conf += "\n[Build]\nFormat=tar\n\n[Tools]\n# The fixture repository has no mkfs tools to lock; a tar needs none.\nToolsTree=host\n"
    (definition / "reprobuild.conf").write_text(conf)
    spec = load_spec(definition)
    source = LockSource(id="fixture/main", archive="debian", suite="stable", codename="stable", component="main",
                        date="Wed, 01 Jan 2025 00:00:00 UTC", snapshot="20250101T000000Z",
                        inrelease_sha256="0" * 64, packages_sha256="0" * 64)
    package = LockedPackage(name=control.package, version=control.version, architecture=control.architecture,
                            source="fixture/main", source_package=control.package, source_version=control.version,
                            path=f"pool/main/h/hostbase/{deb.name}", size=deb.stat().st_size, sha256=sha,
                            installed_size=0, essential=True, priority="required", multi_arch="no", depends=(),
                            pre_depends=(), reason="requested", urls=(f"{url_base}/{deb.name}",))
    lock = Lock(config_digest=spec.digest(), distribution="debian", release="trixie", architecture="amd64",
                source_date_epoch=EPOCH, seed="5eed" * 8, sources=(source,),
                sets=(PackageSet("image", "trixie", "minbase", (), False, (package,)),),
                config=spec.digest_input())
    save_lock(lock, definition / "reprobuild.lock")
    return definition
