"""``reprobuild store push REFERENCE --lock L``: the lock's package objects as blobs of an OCI
repository, so builders can use it as ``Substituters=oci://registry/repository``.

Each object is pushed as the blob ``sha256:<its store name>`` (a store object and a registry blob
are both named by the sha256 of their bytes, so nothing is re-encoded). An artifact manifest of
type :data:`ARTIFACT_STORE` lists them as layers of type ``application/vnd.debian.binary-package``
titled ``<name>_<version>_<architecture>.deb``, sorted by digest, and is tagged with the
reference's tag (``lock-<hex of the lock digest>`` when none is given): it keeps the blobs
referenced, so the registry's garbage collection does not remove them, and says which lock they
serve. Uploads are idempotent: blobs already there are skipped, and two builders pushing the same
objects at once both succeed. Layout: docs/registry.md.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from reprobuild.errors import StoreError, UsageError
from reprobuild.lockfile import Lock, lock_digest
from reprobuild.registry.client import RegistryClient
from reprobuild.registry.layout import FileBlob, artifact_manifest, empty_config
from reprobuild.registry.reference import Reference
from reprobuild.rootfs.oci import Blob
from reprobuild.store import Store

ARTIFACT_STORE = "application/vnd.reprobuild.store.v1"
MEDIA_DEB = "application/vnd.debian.binary-package"
Say = Callable[[str], None]


@dataclass(frozen=True)
class StorePushResult:
    reference: str
    digest: str  # of the store manifest
    objects: int
    uploaded: int
    bytes_uploaded: int

    def as_json(self) -> dict[str, Any]:
        return {"schema": "reprobuild-store-push/1", "reference": self.reference, "digest": self.digest,
                "objects": self.objects, "uploaded": self.uploaded, "bytes_uploaded": self.bytes_uploaded}


def deb_title(name: str, version: str, architecture: str) -> str:
    """The pool file name of a package (an epoch's ``:`` written ``%3a``, as the archive does)."""
    return f"{name}_{version.replace(':', '%3a')}_{architecture}.deb"


def push_store(store: Store, lock: Lock, ref: Reference, client: RegistryClient,
               say: Say = lambda _m: None, jobs: int = 4) -> StorePushResult:  # fmt: skip
    """Push every package object of ``lock`` from ``store`` (``jobs`` uploads at a time, over the
    client's one pooled session) and then the manifest listing them."""
    if ref.digest:
        raise UsageError(f"{ref}: store push pushes to a tag; leave out the @digest")
    packages = sorted(lock.all_packages(), key=lambda p: p.sha256)
    missing = [p.name for p in packages if not store.has(p.sha256)]
    if missing:
        raise StoreError(f"{len(missing)} objects of the lock are not in the store ({', '.join(missing[:3])}"
                         f"{', …' if len(missing) > 3 else ''})", hint="run reprobuild fetch first")  # fmt: skip
    files = [FileBlob(Blob(MEDIA_DEB, "sha256:" + p.sha256, p.size, path=store.path(p.sha256)),
                      deb_title(p.name, p.version, p.architecture)) for p in packages]  # fmt: skip
    config = empty_config()
    client.push_blob(config.digest, config.size, data=config.data)  # also connects and authenticates once
    uploaded = sent = 0
    with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="reprobuild-push") as pool:
        futures = {pool.submit(client.push_blob, f.blob.digest, f.blob.size, path=f.blob.path): f for f in files}
        for done, future in enumerate(as_completed(futures), 1):
            f = futures[future]
            if future.result():
                uploaded += 1
                sent += f.blob.size
                say(f"[{done}/{len(files)}] uploaded {f.title}")
    manifest = artifact_manifest(ARTIFACT_STORE, files, lock.source_date_epoch)
    assert manifest.data is not None
    tag = ref.tag or "lock-" + lock_digest(lock).removeprefix("sha256:")
    client.put_manifest(tag, manifest.data, manifest.media_type)
    return StorePushResult(f"{ref.registry}/{ref.repository}:{tag}@{manifest.digest}", manifest.digest,
                           len(files), uploaded, sent)  # fmt: skip


__all__ = ["ARTIFACT_STORE", "MEDIA_DEB", "StorePushResult", "deb_title", "push_store"]
