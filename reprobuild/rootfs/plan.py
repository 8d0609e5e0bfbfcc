"""What the root-tree stage takes as input: the planned packages and the image settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reprobuild.image.sysupdate import UpdatePlan

if TYPE_CHECKING:
    from reprobuild.config import ImageSpec
    from reprobuild.lockfile import PackageSet


@dataclass(frozen=True)
class PlannedPackage:
    """One package of the lock, with its relationships already resolved to names in the plan."""

    name: str
    version: str
    architecture: str
    sha256: str
    essential: bool
    priority: str
    depends: tuple[str, ...]  # names (within the plan) this package's Depends resolved to
    pre_depends: tuple[str, ...]  # names its Pre-Depends resolved to
    auto_installed: bool = False  # pulled in as a dependency, not asked for: apt's extended_states


@dataclass(frozen=True)
class AddedFile:
    """A path reprobuild itself wrote, changed or removed in the tree — not a package's doing —
    and the setting (or rule) that caused it. The manifest lists these (``added_files``)."""

    path: str  # absolute, as in the image: "/etc/hostname"
    action: str  # "written", "changed" or "removed"
    cause: str  # "Hostname=", "ExtraTrees=extra", "normalisation: …"

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "action": self.action, "cause": self.cause}


@dataclass(frozen=True)
class TreeSettings:
    """Image settings applied to the tree (mkosi-style names in the comments)."""

    hostname: str | None = None  # Hostname=
    root_password: str | None = None  # RootPassword=: plain text, or "hashed:$y$…" / "hashed:$6$…"
    autologin: bool = False  # Autologin=
    locale: str | None = None  # Locale=
    timezone: str | None = None  # Timezone=
    machine_id: str = ""  # MachineId=: "" = empty file, "uninitialized", or 32 hex digits
    skeleton_trees: tuple[Path, ...] = ()  # SkeletonTrees=: copied in before packages
    extra_trees: tuple[Path, ...] = ()  # ExtraTrees=: copied in after packages
    postinst_scripts: tuple[Path, ...] = ()  # PostInstallationScripts=: run in the sandbox
    remove_files: tuple[str, ...] = ()  # RemoveFiles=: globs, relative to the tree root
    clean_package_metadata: bool = True  # CleanPackageMetadata=: drop apt lists and caches
    keep_dpkg_status: bool = True  # keep /var/lib/dpkg (status, info) even when cleaning
    image_id: str | None = None  # [Build] ImageId=: IMAGE_ID= in os-release
    image_version: str | None = None  # [Build] ImageVersion=: IMAGE_VERSION= in os-release
    updates: UpdatePlan | None = None  # [Updates]: /usr/lib/sysupdate.d/*.transfer
    update_public_key: Path | None = None  # [Updates] PublicKey=: /etc/systemd/import-pubring.gpg


def _relation_names(field: str) -> list[list[str]]:
    """``"a (>= 1) | b:any, c"`` → ``[["a", "b"], ["c"]]`` (names only; versions are the lock's job)."""
    groups = []
    for group in field.split(","):
        alts = [alt.strip().split(" ", 1)[0].split("(", 1)[0].split(":", 1)[0] for alt in group.split("|")]
        alts = [a for a in alts if a]
        if alts:
            groups.append(alts)
    return groups


def plan_from_debs(debs: Sequence[Path]) -> tuple[list[PlannedPackage], dict[str, Path]]:
    """Build a plan from a set of .deb files (tests and ad-hoc builds; the lock does this for real).

    Each dependency group resolves to its first alternative present in the set, else to a package
    in the set that Provides it; groups satisfied by nothing in the set are dropped. Returns the
    packages sorted by name and a sha256 → path map for ``deb_path``. Cost: reads every control
    member and hashes every file.
    """
    import hashlib

    from reprobuild.debian.deb import read_control

    controls = {}
    paths: dict[str, Path] = {}
    for path in debs:
        c = read_control(Path(path))
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        controls[c.package] = (c, digest)
        paths[digest] = Path(path)
    provided: dict[str, str] = {}
    for name in sorted(controls):
        for group in _relation_names(controls[name][0].fields.get("Provides", "")):
            provided.setdefault(group[0], name)

    def resolve(field: str) -> tuple[str, ...]:
        out: list[str] = []
        for alts in _relation_names(field):
            hit = next((a for a in alts if a in controls), None) or next(
                (provided[a] for a in alts if a in provided), None)
            if hit and hit not in out:
                out.append(hit)
        return tuple(out)

    plan = []
    for name in sorted(controls):
        c, digest = controls[name]
        f = c.fields
        plan.append(PlannedPackage(
            name=name, version=c.version, architecture=c.architecture, sha256=digest,
            essential=f.get("Essential", "no") == "yes", priority=f.get("Priority", "optional"),
            depends=resolve(f.get("Depends", "")), pre_depends=resolve(f.get("Pre-Depends", "")),
        ))
    return plan, paths


def planned_packages(package_set: PackageSet) -> list[PlannedPackage]:
    """A locked package set in the form the root-tree builder takes."""
    return [
        PlannedPackage(name=p.name, version=p.version, architecture=p.architecture, sha256=p.sha256,
                       essential=p.essential, priority=p.priority, depends=p.depends, pre_depends=p.pre_depends,
                       auto_installed=p.reason.startswith("dependency"))
        for p in package_set.packages
    ]


def package_set_inputs(package_set: PackageSet) -> dict[str, Any]:
    """Everything of a locked set that the tree builder reads (see :func:`planned_packages`), as
    cache-key data."""
    return {
        "name": package_set.name,
        "packages": [[p.name, p.version, p.architecture, p.sha256, p.essential, p.priority,
                      list(p.depends), list(p.pre_depends), p.reason.startswith("dependency")]
                     for p in package_set.packages],
    }  # fmt: skip


def tree_settings(spec: ImageSpec) -> TreeSettings:
    """The ``[Content]`` settings the root-tree builder applies."""
    c = spec.content
    return TreeSettings(
        hostname=c.hostname, root_password=c.root_password, autologin=c.autologin, locale=c.locale,
        timezone=c.timezone, machine_id=c.machine_id, skeleton_trees=c.skeleton_trees,
        extra_trees=c.extra_trees, postinst_scripts=c.postinst_scripts, remove_files=c.remove_files,
        clean_package_metadata=c.clean_package_metadata,
        image_id=spec.build.image_id, image_version=spec.build.image_version,
    )
