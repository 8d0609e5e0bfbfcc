"""Stage ``buildenv``: the lock's ``build`` set (the image's packages at their image versions plus
``BuildPackages=``) installed into a tree by dpkg in the sandbox, normalised like every tree.
Kept extracted in the store: the ``build`` stage runs its scripts in a writable view of it, so
the tree itself never changes and a source edit reuses it."""

from __future__ import annotations

from reprobuild.stages.packagetree import PackageSetTreeStage


class BuildEnvStage(PackageSetTreeStage):
    name = "buildenv"
    package_set = "build"
    what = "the build environment"
