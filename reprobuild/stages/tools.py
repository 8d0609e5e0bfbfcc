"""Stage ``tools``: the programs that write the file systems and the ESP.

``ToolsTree=lock``: the lock's ``tools`` package set installed into a tree, kept extracted in the
store and used in place (tools run chrooted into it, writing only to binds and tmpfs).
``ToolsTree=host``: nothing is built; the identity is the host's package versions, so a host
upgrade of mkfs.erofs invalidates what it made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reprobuild.pipeline.context import BuildContext
from reprobuild.pipeline.stage import Stage, Upstream
from reprobuild.stages.packagetree import PackageSetTreeStage
from reprobuild.tools import host_versions


class LockedToolsStage(PackageSetTreeStage):
    name = "tools"
    package_set = "tools"
    what = "the tools tree"


class HostToolsStage(Stage):
    name = "tools"
    produces = "nothing"

    def __init__(self) -> None:
        self._versions: dict[str, str] | None = None

    def versions(self) -> dict[str, str]:
        if self._versions is None:
            self._versions = host_versions()
        return self._versions

    def inputs(self, ctx: BuildContext) -> dict[str, Any]:
        return {"host": self.versions()}

    def run(self, ctx: BuildContext, up: Upstream, out: Path) -> dict[str, Any]:
        return {"host": self.versions()}
