"""Session fixtures shared by several test modules, registered here so that modules use them by
parameter name without importing them (an import would shadow the parameter).

* ``tests.live_images``: the live trixie/bookworm definitions and their image pairs;
* ``tests.repo_fixture``: the signed fixture apt repository and its HTTP server;
* ``tests.test_uki`` / ``tests.test_vm``: the Debian boot files and the images the boot tests run.
"""

from tests.live_images import (  # noqa: F401
    bootable_disk,
    bootable_trixie,
    live_keys,
    live_root,
    minimal_bookworm,
    minimal_disk,
    minimal_tar,
    minimal_trixie,
    warm_store,
)
from tests.repo_fixture import fixture_repo, repo_server  # noqa: F401
from tests.test_uki import debian_boot_files  # noqa: F401
from tests.test_vm import boot_images  # noqa: F401
