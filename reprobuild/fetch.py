"""Parallel, verified downloads of the objects a lock needs into the store.

For each missing object the lock's URLs are tried in order, then every substituter (a plain
HTTP base URL serving another store's ``objects/sha256/ab/<hex>`` layout, so any static web
server over a store directory is a binary cache; or ``oci://registry/repository``, whose blobs
``reprobuild store push`` wrote, read with the credentials of REGISTRY_AUTH_FILE or
~/.docker/config.json). A download is kept only if its size and sha256 match; :meth:`reprobuild.store.Store.put_stream` checks both while streaming and never
reads more than the expected size plus one chunk, so a hostile or broken server can neither
place a wrong object in the store nor make us read forever.

Takes plain data (:class:`FetchItem`), not a Lock, so it does not depend on the lockfile module.
Never prints: progress goes to the :class:`reprobuild.progress.Progress` it is given.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import requests
import requests.auth
import urllib3.exceptions

from reprobuild import __version__
from reprobuild.errors import FetchError
from reprobuild.progress import NullProgress, Progress, format_bytes
from reprobuild.registry.auth import substituter_auth
from reprobuild.registry.reference import PREFIX as OCI_PREFIX
from reprobuild.registry.reference import substituter_blob_urls
from reprobuild.store import ObjectMismatch, Store, check_sha256, object_relpath

NET_CHUNK = 256 * 1024
MAX_LISTED = 25  # failures spelled out in an error message; the rest are counted
MISSING_HINT = ("the package may no longer be on the mirror: configure a snapshot mirror or a "
                "substituter (Substituters=), or run `reprobuild lock --update`")


@dataclass(frozen=True)
class FetchItem:
    """One object to fetch: a name for people, its address and size, and where to get it."""

    name: str
    sha256: str
    size: int
    urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_sha256(self.sha256)
        if self.size < 0:
            raise FetchError(f"{self.name}: negative size {self.size}")


@dataclass(frozen=True)
class FetchConfig:
    """Timeouts and retry policy. The defaults suit a public mirror; tests shorten them."""

    retries: int = 3  # extra attempts per URL after a transient failure (timeout, 5xx, reset)
    backoff: float = 0.5  # seconds before the first retry, doubled for each further retry
    backoff_max: float = 8.0
    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # longest wait for the next bytes
    # Overall deadline per download, so a server dribbling one byte per read timeout cannot
    # hold a worker forever: deadline_base + size / min_rate seconds.
    deadline_base: float = 60.0
    min_rate: float = 16 * 1024

    def deadline_for(self, size: int) -> float:
        return self.deadline_base + size / self.min_rate


@dataclass(frozen=True)
class Attempt:
    """One try of one URL and what it answered, in words for people."""

    url: str
    outcome: str
    transient: bool  # worth retrying (timeout, 5xx, connection reset)
    not_found: bool = False  # HTTP 404/410


@dataclass(frozen=True)
class FetchFailure:
    item: FetchItem
    attempts: tuple[Attempt, ...]

    def format(self) -> str:
        lines = [f"{self.item.name} (sha256:{self.item.sha256}, {format_bytes(self.item.size)}):"]
        if not self.attempts:
            lines.append("    no URL and no substituter to try")
        lines += [f"    {a.url}: {a.outcome}" for a in self.attempts]
        return "\n".join(lines)


@dataclass(frozen=True)
class FetchReport:
    """What fetch_all did: objects downloaded (and from where), objects already present."""

    fetched: tuple[tuple[FetchItem, str], ...]  # (item, the URL that served it)
    present: tuple[FetchItem, ...]
    bytes_downloaded: int
    seconds: float

    @property
    def rate(self) -> float:
        """Bytes per second over the whole run."""
        return self.bytes_downloaded / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, object]:
        return {
            "fetched": [{"name": i.name, "sha256": i.sha256, "size": i.size, "url": u} for i, u in self.fetched],
            "present": [{"name": i.name, "sha256": i.sha256} for i in self.present],
            "bytes_downloaded": self.bytes_downloaded,
            "seconds": round(self.seconds, 3),
        }


class FetchFailed(FetchError):
    """Some objects could not be fetched and verified from any source; all others were kept."""

    def __init__(self, failures: Sequence[FetchFailure], report: FetchReport, total: int) -> None:
        shown = failures[:MAX_LISTED]
        body = "\n".join("  " + f.format().replace("\n", "\n  ") for f in shown)
        if len(failures) > len(shown):
            body += f"\n  … and {len(failures) - len(shown)} more"
        not_found = any(a.not_found for f in failures for a in f.attempts)
        super().__init__(f"could not fetch {len(failures)} of {total} object(s):\n{body}",
                         hint=MISSING_HINT if not_found else None)
        self.failures = tuple(failures)
        self.report = report


class ObjectsMissing(FetchError):
    """--offline: the store lacks objects and the network may not be used."""

    def __init__(self, missing: Sequence[FetchItem]) -> None:
        listing = "\n".join(f"  {i.name} (sha256:{i.sha256}, {format_bytes(i.size)})" for i in missing)
        super().__init__(f"offline, and {len(missing)} object(s) are not in the store:\n{listing}",
                         hint="run `reprobuild fetch` with network access, or "
                              "`reprobuild store import BUNDLE` from a machine that has them")
        self.missing = tuple(missing)


class _Cancelled(Exception):
    pass


class _Deadline(Exception):
    pass


def make_session(jobs: int = 4, auth: requests.auth.AuthBase | None = None) -> requests.Session:
    """A pooled session for ``jobs`` concurrent downloads (connections are reused per host);
    ``auth`` answers the ``oci://`` substituters' challenges
    (:func:`reprobuild.registry.auth.substituter_auth`)."""
    s = requests.Session()
    s.auth = auth
    # Retries are ours (per URL, with backoff, and visible in errors), not urllib3's.
    adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=max(jobs, 1), max_retries=0)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    # identity: the sha256 in the lock is of the bytes on the server, never of a re-encoding.
    s.headers.update({"User-Agent": f"reprobuild/{__version__}", "Accept-Encoding": "identity"})
    return s


def substituter_url(base: str, sha256: str) -> str:
    """Where a store substituter serves an object: ``<base>/objects/sha256/ab/<hex>``."""
    return f"{base.rstrip('/')}/{object_relpath(sha256)}"


def substituter_urls(base: str, sha256: str) -> tuple[str, ...]:
    """Where a substituter serves an object: a store's URL, or for an OCI registry
    (``oci://registry/repository``, docs/registry.md) the blob ``sha256:<hex>``."""
    if base.startswith(OCI_PREFIX):
        return substituter_blob_urls(base, sha256)
    return (substituter_url(base, sha256),)


def candidate_urls(item: FetchItem, substituters: Sequence[str]) -> tuple[str, ...]:
    """The lock's URLs in order, then each substituter; duplicates dropped."""
    urls = list(item.urls) + [u for b in substituters for u in substituter_urls(b, item.sha256)]
    return tuple(dict.fromkeys(urls))


def _dedupe(items: Iterable[FetchItem]) -> list[FetchItem]:
    by_sha: dict[str, FetchItem] = {}
    for it in items:
        old = by_sha.get(it.sha256)
        if old is None:
            by_sha[it.sha256] = it
        elif old.size != it.size:
            raise FetchError(f"{old.name} and {it.name} have sha256:{it.sha256} "
                             f"but sizes {old.size} and {it.size}")
        else:  # same object under two names: try every URL either offers
            by_sha[it.sha256] = FetchItem(old.name, old.sha256, old.size,
                                          tuple(dict.fromkeys(old.urls + it.urls)))
    return list(by_sha.values())


class _HostHealth:
    """Hosts that refused connections: later objects try them once, without retries.

    Without this a dead mirror would cost every object the whole backoff schedule."""

    def __init__(self) -> None:
        self._down: set[str] = set()
        self._lock = threading.Lock()

    def is_down(self, url: str) -> bool:
        with self._lock:
            return urlsplit(url).netloc in self._down

    def mark(self, url: str, down: bool) -> None:
        with self._lock:
            (self._down.add if down else self._down.discard)(urlsplit(url).netloc)


def _describe(e: BaseException, config: FetchConfig) -> tuple[str, bool]:
    """(what went wrong in a few words, transient?) for a network exception."""
    chain: list[BaseException] = []
    x: BaseException | None = e
    while x is not None and len(chain) < 10:
        chain.append(x)
        x = x.__cause__ or x.__context__ or next((a for a in getattr(x, "args", ()) if isinstance(a, BaseException)), None)
    # errno first: urllib3's NewConnectionError (e.g. connection refused) subclasses its
    # ConnectTimeoutError, so the class alone would call a refusal a timeout.
    for c in chain:
        if isinstance(c, OSError) and c.strerror:
            return c.strerror.lower(), True
    for c in chain:
        if isinstance(c, (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError)):
            return f"stalled: no data for {config.read_timeout:g} s", True
        if isinstance(c, (requests.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError, TimeoutError)):
            return f"no connection within {config.connect_timeout:g} s", True
    if isinstance(e, (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError)):
        return "connection broken mid-transfer", True
    text = str(e) or type(e).__name__
    return (text[:200] + "…") if len(text) > 200 else text, True


def _try_url(session: requests.Session, url: str, item: FetchItem, store: Store, config: FetchConfig,
             progress: Progress, cancel: threading.Event) -> Attempt | None:
    """Download ``url`` into the store as ``item``; None on success, else what went wrong."""
    counted = 0
    ok = False
    deadline = time.monotonic() + config.deadline_for(item.size)

    def chunks(resp: requests.Response) -> Iterator[bytes]:
        nonlocal counted
        while True:
            if cancel.is_set():
                raise _Cancelled()
            if time.monotonic() > deadline:
                raise _Deadline()
            # read1 returns whatever arrived (up to NET_CHUNK), so the deadline is checked at
            # least once per read timeout even against a server that dribbles bytes. Never
            # decode: the lock hashes the file as stored, and some servers wrongly label .gz
            # files Content-Encoding: gzip.
            chunk = resp.raw.read1(NET_CHUNK, decode_content=False)
            if not chunk:
                return
            counted += len(chunk)
            progress.advance(len(chunk))
            yield chunk

    try:
        with session.get(url, stream=True, timeout=(config.connect_timeout, config.read_timeout)) as resp:
            if resp.status_code != 200:
                code = resp.status_code
                return Attempt(url, f"HTTP {code} {resp.reason or ''}".rstrip(),
                               transient=code >= 500 or code in (408, 429), not_found=code in (404, 410))
            announced = resp.headers.get("Content-Length")
            if announced is not None and announced.isdigit() and int(announced) != item.size:
                return Attempt(url, f"server announces {announced} bytes, the lock says {item.size}",
                               transient=False)
            store.put_stream(chunks(resp), item.sha256, item.size)
            ok = True
            return None
    except ObjectMismatch as e:
        outcome = {
            "long": f"sent more than the expected {item.size} bytes (refused)",
            "short": f"sent only {counted} of {item.size} bytes",
            "sha256": f"wrong content: {e.message}",
        }[e.reason]
        return Attempt(url, outcome, transient=False)
    except _Deadline:
        return Attempt(url, f"too slow: not done within {config.deadline_for(item.size):.0f} s", transient=True)
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
        what, transient = _describe(e, config)
        return Attempt(url, what, transient=transient)
    finally:
        if counted and not ok:
            progress.advance(-counted)  # take back the bytes of a refused download


@dataclass
class _Outcome:
    item: FetchItem
    url: str | None = None  # the URL that served it; None if present or failed
    racer: bool = False  # another process stored it while we waited for the object lock
    attempts: list[Attempt] = field(default_factory=list)


def _fetch_one(session: requests.Session, item: FetchItem, substituters: Sequence[str], store: Store,
               config: FetchConfig, progress: Progress, cancel: threading.Event,
               health: _HostHealth) -> _Outcome:
    out = _Outcome(item)
    # One writer per object across processes: a racer waits here, then finds it present.
    with store.object_lock(item.sha256):
        if store.has(item.sha256):
            out.racer = True
            return out
        for url in candidate_urls(item, substituters):
            tries = 1 if health.is_down(url) else 1 + config.retries
            for k in range(tries):
                if cancel.is_set():
                    raise _Cancelled()
                attempt = _try_url(session, url, item, store, config, progress, cancel)
                if attempt is None:
                    health.mark(url, down=False)
                    out.url = url
                    return out
                out.attempts.append(attempt)
                if not attempt.transient:
                    break
                if k + 1 < tries:
                    delay = min(config.backoff * 2**k, config.backoff_max)
                    progress.note(f"retrying {item.name} from {url} in {delay:g} s: {attempt.outcome}")
                    cancel.wait(delay)
            else:
                health.mark(url, down=True)  # every try was transient: the host is in trouble
    return out


def fetch_all(
    store: Store,
    items: Iterable[FetchItem],
    substituters: Sequence[str] = (),
    session: requests.Session | None = None,
    jobs: int = 4,
    offline: bool = False,
    progress: Progress | None = None,
    config: FetchConfig | None = None,
    env: Mapping[str, str] | None = None,
) -> FetchReport:
    """Make every object of ``items`` present in ``store``; return what was done.

    Objects already present are not touched (no network). Missing ones are downloaded by
    ``jobs`` threads sharing ``session`` (a pooled one is made if None), biggest first. Raises
    ObjectsMissing if ``offline`` and anything is missing; FetchFailed (naming each object, each
    URL tried and what it answered) if some objects could not be fetched — every object that
    could be fetched is kept. Holds the store lock shared for the whole run, so gc waits. ``env``
    gives the ``oci://`` substituters' credentials when the session is made here.
    Cost: one stat per object, then network-bound; memory O(jobs × NET_CHUNK).
    """
    config = config or FetchConfig()
    progress = progress or NullProgress()
    wanted = _dedupe(items)
    t0 = time.monotonic()
    with store.in_use():
        present = [i for i in wanted if store.has(i.sha256)]
        missing = sorted((i for i in wanted if not store.has(i.sha256)), key=lambda i: (-i.size, i.sha256))
        if offline:
            if missing:
                raise ObjectsMissing(sorted(missing, key=lambda i: i.name))
            return FetchReport((), tuple(present), 0, time.monotonic() - t0)
        if not missing:
            return FetchReport((), tuple(present), 0, time.monotonic() - t0)
        store.clean_tmp()  # leftovers of killed processes; never a live writer's
        own_session = session is None
        session = session or make_session(jobs, substituter_auth(substituters, env or {}))
        cancel = threading.Event()
        health = _HostHealth()
        outcomes: list[_Outcome] = []
        progress.start("fetch", len(missing), sum(i.size for i in missing))
        pool = ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="reprobuild-fetch")
        try:
            futures = [pool.submit(_fetch_one, session, i, substituters, store, config, progress, cancel, health)
                       for i in missing]
            for fut in as_completed(futures):
                o = fut.result()
                outcomes.append(o)
                status = "fetched" if o.url else "present" if o.racer else "failed"
                progress.item_done(o.item.name, status, o.item.size if o.url else 0)
        except BaseException:
            cancel.set()  # workers stop at their next chunk; their temporaries are removed
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            progress.finish()
            if own_session:
                session.close()
    fetched = tuple(sorted(((o.item, o.url) for o in outcomes if o.url), key=lambda t: t[0].name))
    present += [o.item for o in outcomes if o.racer]
    report = FetchReport(fetched, tuple(sorted(present, key=lambda i: i.name)),
                         sum(i.size for i, _ in fetched), time.monotonic() - t0)
    failures = sorted((FetchFailure(o.item, tuple(o.attempts)) for o in outcomes if not o.url and not o.racer),
                      key=lambda f: f.item.name)
    if failures:
        raise FetchFailed(failures, report, len(wanted))
    return report
