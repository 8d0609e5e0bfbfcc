"""The root-tree stage: planned packages + settings → a normalised root tree (or tar).

Order (mkosi's, with mmdebstrap's install): skeleton trees → packages (Essential extracted, then the
tree's dpkg in the sandbox) → extra trees → post-installation scripts → settings (hostname,
password, locale, time zone, autologin, machine id) → RemoveFiles= → normalisation → mtime clamp.

Atomicity: the tree is built under ``out.parent/.<name>.tmp-XXXX`` and renamed to ``out`` only when
complete. On any error or KeyboardInterrupt the partial tree is removed. Mounts exist only inside
the sandbox's private mount namespace, so none can outlive a build.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from reprobuild.errors import BuildError
from reprobuild.rootfs import install as _install
from reprobuild.rootfs import settings as _settings
from reprobuild.rootfs.archive import write_tar
from reprobuild.rootfs.normalize import normalize
from reprobuild.rootfs.plan import AddedFile, PlannedPackage, TreeSettings
from reprobuild.rootfs.sandbox import DEFAULT_HOSTNAME, check_can_sandbox

__all__ = ["AddedFile", "PlannedPackage", "TreeSettings", "build_tree", "configure_tree", "install_packages", "sandbox_env",
           "write_tar"]


def sandbox_env(epoch: int) -> dict[str, str]:
    """What maintainer and post-installation scripts get on top of the sandbox's base environment."""
    # SOURCE_DATE_EPOCH: shadow (useradd, pwconv), systemd-sysusers, and many generators honour it.
    # INITRD=No: Debian's kernel postinst hook (/etc/kernel/postinst.d/initramfs-tools) skips
    # update-initramfs. reprobuild builds the image's initrd itself from the locked initrd set;
    # a second one in /boot would cost half a minute, never be booted, and depend on the host.
    return {"SOURCE_DATE_EPOCH": str(epoch), "INITRD": "No"}


def build_tree(
    packages: Sequence[PlannedPackage],
    deb_path: Callable[[str], Path],
    out: Path,
    settings: TreeSettings,
    epoch: int,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Build the root tree for ``packages`` at ``out`` (which must not exist).

    ``deb_path(sha256)`` gives the verified .deb in the store. Raises BuildError (and subclasses
    such as MaintainerScriptFailed), FormatError for hostile or corrupt packages, ConfigError for
    bad settings. Cost: dominated by dpkg (≈15 s for a trixie minbase on 2 cores).
    """
    report = progress or (lambda _m: None)
    out = Path(out)
    if os.path.lexists(out):
        raise BuildError(f"{out} already exists", hint="remove it or choose another output path")
    if not packages:
        raise BuildError("no packages to install")
    check_can_sandbox()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    done = False
    # Reproducibility: modes are set explicitly everywhere; umask 022 (docs/formats.md §11) is a second
    # line of defence for anything created with default modes. Restored afterwards.
    old_umask = os.umask(0o022)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the root directory of a system is 0755
        install_packages(tmp, packages, deb_path, settings, epoch, report)
        configure_tree(tmp, settings, epoch, report)
        os.rename(tmp, out)
        done = True
    finally:
        os.umask(old_umask)
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)


def _files(paths: Sequence[str], action: str, cause: str) -> list[AddedFile]:
    return [AddedFile("/" + p.lstrip("/"), action, cause) for p in paths]


def _named(path: Path | str, base: Path | None) -> str:
    """A tree or script as the manifest names it: relative to the definition's directory (so the
    manifest does not depend on where the checkout is), else as given."""
    return os.path.relpath(path, base) if base is not None else str(path)


def install_packages(tree: Path, packages: Sequence[PlannedPackage], deb_path: Callable[[str], Path],
                     settings: TreeSettings, epoch: int, report: Callable[[str], None],
                     base: Path | None = None) -> list[AddedFile]:  # fmt: skip
    """First half of :func:`build_tree`, in place: skeleton trees, then the packages (dpkg).

    The build cache keeps the result of this half apart, so that an edit of an extra tree or a
    setting re-runs only :func:`configure_tree`. Callers set umask 022 and clean up on failure.
    Returns the files this code wrote itself (not dpkg or a maintainer script), with their cause
    (trees named relative to ``base``, the definition's directory).
    """
    added: list[AddedFile] = []
    for skel in settings.skeleton_trees:
        report(f"copying skeleton tree {skel}")
        added += _files(_settings.copy_tree_into(tree, Path(skel), epoch), "written", f"SkeletonTrees={_named(skel, base)}")
    # The image's hostname is also the sandbox's, so scripts that record it see the final one.
    written = _install.install(tree, packages, deb_path, env=sandbox_env(epoch),
                               hostname=settings.hostname or DEFAULT_HOSTNAME, progress=report)
    return added + [AddedFile("/" + path, "written", f"package installation: {why}") for path, why in written]


def configure_tree(tree: Path, settings: TreeSettings, epoch: int, report: Callable[[str], None],
                   base: Path | None = None) -> list[AddedFile]:  # fmt: skip
    """Second half of :func:`build_tree`, in place on an installed tree: extra trees,
    post-installation scripts, settings, RemoveFiles=, normalisation. Returns every file it
    wrote, changed or removed, with the setting or rule that caused it (what post-installation
    scripts do is theirs: ``reprobuild verify --audit`` finds it). Trees are named relative to
    ``base``, the definition's directory."""
    added: list[AddedFile] = []
    for extra in settings.extra_trees:
        report(f"copying extra tree {extra}")
        added += _files(_settings.copy_tree_into(tree, Path(extra), epoch), "written", f"ExtraTrees={_named(extra, base)}")
    _settings.run_postinst_scripts(tree, tuple(Path(s) for s in settings.postinst_scripts), sandbox_env(epoch),
                                   settings.hostname or DEFAULT_HOSTNAME, report)
    if settings.hostname:
        added += _files(_settings.set_hostname(tree, settings.hostname, epoch), "written",
                        f"Hostname={settings.hostname}")
    if settings.root_password is not None:
        added += _files(_settings.set_root_password(tree, settings.root_password, epoch), "changed",
                        "RootPassword= (root's password hash)")
    if settings.locale:
        added += _files(_settings.set_locale(tree, settings.locale, epoch), "written", f"Locale={settings.locale}")
    if settings.timezone:
        added += _files(_settings.set_timezone(tree, settings.timezone, epoch), "written",
                        f"Timezone={settings.timezone}")
    if settings.autologin:
        added += _files(_settings.set_autologin(tree, epoch), "written", "Autologin=yes")
    if settings.image_id or settings.image_version:
        added += _files(_settings.set_image_release(tree, settings.image_id, settings.image_version, epoch), "changed",
                        " ".join(f"{k}={v}" for k, v in (("ImageId", settings.image_id),
                                                          ("ImageVersion", settings.image_version)) if v))
    if settings.updates is not None:
        added += _files(_settings.set_updates(tree, settings.updates, settings.update_public_key, epoch), "written",
                        f"[Updates] Source={settings.updates.source}")
    added += _files(_settings.set_machine_id(tree, settings.machine_id, epoch), "written",
                    f"MachineId={settings.machine_id}" if settings.machine_id else
                    "MachineId= (empty: systemd sets the id at first boot)")
    for path, pattern in _settings.remove_files(tree, settings.remove_files):
        added.append(AddedFile("/" + path, "removed", f"RemoveFiles={pattern}"))
    report("normalising the tree")
    removed = normalize(tree, epoch, clean_package_metadata=settings.clean_package_metadata,
                        keep_dpkg_status=settings.keep_dpkg_status)
    added += [AddedFile(path, "removed", f"normalisation: {why}") for path, why in removed]
    return added
