"""Output and index directories on object storage, staged through a local folder.

A job whose ``--output`` or ``--index-dir`` is a URL works in a local folder (``--scratch-dir``;
one per URL, so a rerun on the same machine finds its work) exactly as it does on a local disk:
memory-mapped index, atomic parts, manifest, locks. The folder is filled from the remote first
(only what is missing or differs: the bookkeeping at once, data files when read, or all of them
once the cluster shows its workers share this folder), and the remote is brought up to date while
the job runs (every ``interval`` seconds) and when it ends, in an order that never shows a partial
state as finished:

1. ``_SUCCESS`` is deleted remotely as soon as it is gone locally (the job is no longer finished);
2. new and changed files are uploaded, each as one object (an object store shows an object only
   once its upload completes, so no partial object is ever visible);
3. at the end, remote files under the tool's own names that are gone locally are deleted;
4. ``manifest.json`` goes up after the files it lists, and ``_SUCCESS`` last.

A job killed at any point leaves a remote manifest whose finished pieces are all uploaded (or are
found missing and redone), so a rerun anywhere resumes from the remote; a rerun on the same
machine resumes from its folder. A remote folder holding anything the tool did not write is
refused, and nothing outside the tool's own names is ever deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline.errors import ConfigError, ResumeError
from pipeline.io import nodes
from pipeline.io.owned import LEDGER_NAME, adopt_file, merge_ledger
from pipeline.io.storage import filesystem
from pipeline.io.workdir import INDEX_NAMES, LOCK_NAME, LOG_DIR, OUTPUT_NAMES, gone_here, show_as

__all__ = ["StagedDir", "staged", "staged_dirs", "scratch_for"]

log = logging.getLogger(__name__)

FINAL = ("manifest.json", "_SUCCESS")  # uploaded after everything else, in this order
LEASE_NAME = ".knn-pipeline.lease"  # the remote's one-job-at-a-time lease (see StagedDir.take_lease)


def _finals(local: Path) -> list[str]:
    """The manifests (the index's inside the output first), then ``_SUCCESS``: uploaded last."""
    nested = sorted((p.relative_to(local).as_posix() for p in local.glob("*/manifest.json")), reverse=True)
    return [*nested, *FINAL]


PUSH_INTERVAL = float(os.environ.get("KNN_PIPELINE_PUSH_SECONDS", "30"))  # seconds between uploads while a job runs


def private_root() -> Path:
    """The default staging root, ``TMPDIR/knn-pipeline-UID``: made private (0700) if new, and
    refused unless it is a real directory this user owns that no one else can write to (another
    user could otherwise plant it, or a link in its place, and read or redirect the job's files)."""
    root = Path(tempfile.gettempdir()) / f"knn-pipeline-{os.getuid()}"
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(root)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ConfigError(
            f"{root}: the default staging folder is not a private directory of this user (a link, "
            "another owner, or open to others); remove it, or pass --scratch-dir with a folder of your "
            "own"
        )
    return root


def scratch_for(url: str, scratch_dir: str | None) -> Path:
    """The local folder a remote directory is staged in: one per URL (and user)."""
    root = Path(scratch_dir) if scratch_dir else private_root()
    tail = url.rstrip("/").rsplit("/", 1)[-1] or "root"
    return root / f"{tail}-{hashlib.sha1(url.rstrip('/').encode()).hexdigest()[:12]}"


def _ours(rel: str) -> bool:
    top = rel.split("/", 1)[0]
    return top in OUTPUT_NAMES or top in INDEX_NAMES or top in ("index", "logs", LEDGER_NAME)  # index: run's default


_DATA = (".npy", ".npz", ".parquet", ".faiss", ".ivfdata", ".arrow")


def _data(rel: str) -> bool:
    """Rows, indexes and tables: what a lazy pull leaves on the remote until it is read."""
    return rel.endswith(_DATA)


def _safe_key(rel: str) -> bool:
    """Whether a remote key, relative to the prefix, names a file below it: no ``..``, ``.`` or empty
    segment, no leading slash (a key like ``a/../../x`` would be pulled outside the scratch folder)."""
    parts = rel.split("/")
    return bool(rel) and all(p not in ("", ".", "..") for p in parts) and "\\" not in rel and "\0" not in rel


def _skipped(rel: str) -> bool:
    """Lock files, the lease and the hidden temporary files of writes in progress never leave the
    machine; the ledger of the tool's own files does (a rerun elsewhere needs it)."""
    name = rel.rsplit("/", 1)[-1]
    return name in (LOCK_NAME, LEASE_NAME) or (name.startswith(".") and name != LEDGER_NAME)


LEASE_SECONDS = max(120.0, 4 * PUSH_INTERVAL)  # a lease not renewed for this long is free (its job died)
LEASE_SETTLE = 0.5  # seconds between writing a lease and reading it back (two jobs starting at once)


class StagedDir:
    """One remote directory and its local folder (see the module doc)."""

    def __init__(self, url: str, local: Path):
        self.url = url.rstrip("/")
        self.local = local
        self.fs, self.root = filesystem(self.url)
        self._sent: dict[str, tuple[int, int]] = {}  # rel path -> (size, mtime_ns) as last uploaded or pulled
        self._lock = threading.Lock()  # one push at a time
        self._lock_sent = threading.Lock()  # the tables below, between a push and a task's fetches
        self._finals = threading.Lock()  # one manifest upload at a time (a push's or a save's)
        self.token = uuid.uuid4().hex
        self._have: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}  # rel -> (remote, local) stamps
        self._sizes: dict[str, int] = {}  # remote sizes this process knows (listed, sent or fetched)
        self._later: set[str] = set()  # data files a lazy pull left on the remote

    # one job at a time -----------------------------------------------------------------------
    def _lease(self) -> dict[str, Any]:
        try:
            with self.fs.open_input_stream(f"{self.root}/{LEASE_NAME}") as fh:
                held = json.loads(fh.read())
            return held if isinstance(held, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_lease(self) -> None:
        self.fs.create_dir(self.root, recursive=True)
        with self.fs.open_output_stream(f"{self.root}/{LEASE_NAME}") as out:
            out.write(
                json.dumps(
                    {
                        "token": self.token,
                        "host": socket.gethostname(),
                        "pid": os.getpid(),
                        "expires": time.time() + LEASE_SECONDS,
                    }
                ).encode()
            )

    def _refuse(self, held: dict[str, Any]) -> ResumeError:
        until = time.strftime("%H:%M:%S", time.localtime(float(held.get("expires", 0))))
        return ResumeError(
            f"{self.url} is in use by another job (pid {held.get('pid')} on {held.get('host')}, whose "
            f"lease runs until {until} unless renewed); wait for it to finish, or use another prefix"
        )

    def take_lease(self) -> None:
        """Hold the remote directory for this job: refused while another job's lease is live (renewed
        with every upload; a killed job's lapses after ``LEASE_SECONDS``, at once on its own host).
        Object stores have no lock: two jobs writing leases together both read back, and only the
        last writer goes on."""
        held = self._lease()
        live = held.get("token") not in (None, self.token) and float(held.get("expires", 0)) > time.time()
        if live and not gone_here(held.get("host"), held.get("pid")):  # a rerun after kill -9 need not wait
            raise self._refuse(held)
        self._write_lease()
        time.sleep(LEASE_SETTLE)
        held = self._lease()
        if held.get("token") != self.token:
            raise self._refuse(held)

    def renew_lease(self) -> None:
        if self._lease().get("token") == self.token:
            self._write_lease()

    def release_lease(self) -> None:
        if self._lease().get("token") == self.token:  # never another job's (or a reader's: none)
            self.fs.delete_file(f"{self.root}/{LEASE_NAME}")

    def _remote(self) -> dict[str, tuple[int, int]]:
        """Remote files below the directory: relative path -> (size, time in ns)."""
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.NotFound:
            return {}
        if info.type == pafs.FileType.File:
            raise ConfigError(f"{self.url}: is a file; give a directory (a prefix) for outputs and indexes")
        found = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True))
        return {
            f.path[len(self.root) :].lstrip("/"): (int(f.size or 0), int(f.mtime_ns or 0))
            for f in found
            if f.type == pafs.FileType.File
        }

    # staging per node (pipeline.io.nodes) -------------------------------------------------
    def _stamp(self, rel: str) -> tuple[int, int] | None:
        info = self.fs.get_file_info(f"{self.root}/{rel}")
        if info.type != pafs.FileType.File:
            return None
        mtime = info.mtime_ns if info.mtime_ns is not None else 0
        return int(info.size or 0), int(mtime)

    def fetch(self, rel: str) -> bool:
        """Bring ``rel`` up to date in the local folder (downloaded when missing, or when the remote
        object changed since this process last fetched or sent it); False if the remote lacks it."""
        remote = self._stamp(rel)
        if remote is None:
            return False
        dest = self.local / rel
        try:
            st = os.lstat(dest)
            here = (st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            here = None
        if here is not None and self._have.get(rel) == (remote, here):
            return True
        self._download(rel, claim=True)
        st = os.lstat(dest)
        nodes.count("fetched", st.st_size)
        with self._lock_sent:
            self._have[rel] = (remote, (st.st_size, st.st_mtime_ns))
            self._sent[rel] = (st.st_size, st.st_mtime_ns)
            self._sizes[rel] = remote[0]
            self._later.discard(rel)
        return True

    def send(self, rel: str) -> None:
        """Upload ``rel`` now. A data file's rewrite is made visible as one: an object replaced
        within the same second at the same size would show the same size and time, so it is
        written again a second later (other machines compare those to know their copy is stale).
        A manifest goes up after the ledgers that vouch for what it lists, never behind a newer one."""
        if rel.rsplit("/", 1)[-1] in FINAL:
            with self._finals:
                if rel.rsplit("/", 1)[-1] == "manifest.json":
                    for ledger in sorted(self.local.rglob(LEDGER_NAME)):
                        self._upload(ledger.relative_to(self.local).as_posix())
                st = os.lstat(self.local / rel)
                self._upload(rel)
                with self._lock_sent:
                    self._sent[rel] = (st.st_size, st.st_mtime_ns)
            return
        before = self._stamp(rel) if _data(rel) else None
        self._upload(rel)
        after = self._stamp(rel)
        if before is not None and after == before:
            time.sleep(1.0)
            self._upload(rel)
            after = self._stamp(rel)
        st = os.lstat(self.local / rel)
        nodes.count("sent", st.st_size)
        with self._lock_sent:
            self._sent[rel] = (st.st_size, st.st_mtime_ns)
            if after is not None:
                self._have[rel] = (after, (st.st_size, st.st_mtime_ns))
                self._sizes[rel] = after[0]

    def drop(self, rel: str) -> None:
        """Remove the remote file ``rel``, or every file below folder ``rel``, under the tool's names."""
        for r, _ in self._under(rel):
            if _ours(r) and _safe_key(r):
                self.fs.delete_file(f"{self.root}/{r}")
            self._forget(r)

    def _under(self, rel: str) -> list[tuple[str, int]]:
        """The remote file ``rel``, or every file below folder ``rel``, with their sizes."""
        path = f"{self.root}/{rel}"
        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            found = self.fs.get_file_info(pafs.FileSelector(path, recursive=True))
            return [
                (f.path[len(self.root) :].lstrip("/"), int(f.size or 0)) for f in found if f.type == pafs.FileType.File
            ]
        return [(rel, int(info.size or 0))] if info.type == pafs.FileType.File else []

    def _forget(self, rel: str) -> None:
        """What this process knew of the remote ``rel``, which is gone."""
        with self._lock_sent:
            self._sent.pop(rel, None)
            self._have.pop(rel, None)
            self._sizes.pop(rel, None)
            self._later.discard(rel)

    def size(self, rel: str) -> int | None:
        if rel not in self._sizes:
            stamp = self._stamp(rel)
            if stamp is None:
                return None
            self._sizes[rel] = stamp[0]
        return self._sizes[rel]

    def names(self, rel: str) -> list[str]:
        """The names of the remote files and folders directly in folder ``rel``."""
        found = self.fs.get_file_info(pafs.FileSelector(f"{self.root}/{rel}".rstrip("/"), allow_not_found=True))
        return [f.base_name for f in found if f.type in (pafs.FileType.File, pafs.FileType.Directory)]

    def open(self, rel: str) -> Any:
        return self.fs.open_input_file(f"{self.root}/{rel}")

    def exists(self, rel: str) -> bool:
        return bool(self.fs.get_file_info(f"{self.root}/{rel}").type != pafs.FileType.NotFound)

    def move(self, src: str, dst: str) -> list[tuple[str, str, int]]:
        """Rename remote file or folder ``src`` to ``dst``, object by object (an object store has no
        rename: each is copied, then deleted)."""
        out = []
        for rel, size in self._under(src):
            new = dst + rel[len(src) :]
            self.fs.create_dir(f"{self.root}/{new}".rsplit("/", 1)[0], recursive=True)
            self.fs.copy_file(f"{self.root}/{rel}", f"{self.root}/{new}")
            self.fs.delete_file(f"{self.root}/{rel}")
            self._forget(rel)
            self._sizes[new] = size
            out.append((rel, new, size))
        return out

    def knows(self, rel: str, size: int) -> None:
        """Another machine uploaded ``rel`` at ``size`` bytes (its task said so)."""
        self._sizes[rel] = size

    def pull(self, lazy: bool = False) -> None:
        """Fill the local folder with what the remote holds and the folder lacks (or holds at
        another size). Refuses a remote directory holding anything the tool did not write.

        ``lazy``: only the bookkeeping (manifests, ledgers, settings, the report); the data files
        (rows, indexes, tables: :func:`_data`) are fetched when read (:meth:`fetch`), or all at
        once by :meth:`pull_rest` where the workers share this folder."""
        listed = {r: v for r, v in self._remote().items() if r != LEASE_NAME}
        remote = {r: n for r, (n, _) in listed.items()}
        self._sizes.update(remote)
        unsafe = sorted(r for r in remote if not _safe_key(r))
        if unsafe:
            raise ConfigError(
                f"{self.url} holds a key whose path leaves its prefix or is empty ({unsafe[0]!r}); "
                "nothing is pulled from it: remove that key or choose another prefix"
            )
        strange = sorted({r.split("/", 1)[0] for r in remote if not _ours(r)})
        if strange:
            raise ConfigError(
                f"{self.url} holds {', '.join(strange[:3])}, which this tool did not write; "
                "choose an empty or new prefix (nothing there is removed)"
            )
        self.local.mkdir(parents=True, exist_ok=True)
        fetched = 0
        for rel, size in sorted(remote.items()):
            dest = self.local / rel
            if rel.rsplit("/", 1)[-1] == LEDGER_NAME:  # merged, never replaced: the local one may know more
                dest.parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open_input_stream(f"{self.root}/{rel}") as fh:
                    merge_ledger(dest, fh.read())
                continue
            held = dest.exists() and dest.stat().st_size == size
            if lazy and _data(rel):
                if held:  # this machine's copy from an earlier run: used as it is, as below
                    st = dest.stat()
                    self._have[rel] = (listed[rel], (st.st_size, st.st_mtime_ns))
                    self._sent[rel] = (st.st_size, st.st_mtime_ns)
                else:
                    self._later.add(rel)
                continue
            if not held:
                self._download(rel)
                fetched += 1
            st = dest.stat()
            self._sent[rel] = (st.st_size, st.st_mtime_ns)
        if remote:
            later = f", {len(self._later)} data file(s) fetched when read" if self._later else ""
            log.info("%s: %d file(s) there, %d fetched into %s%s", self.url, len(remote), fetched, self.local, later)

    def _download(self, rel: str, *, claim: bool = False) -> None:
        """Copy the remote ``rel`` into the local folder, whole, under a temporary name first.
        ``claim``: record it in the ledger as :func:`pipeline.io.atomic.atomic_path` records what it
        writes (a fetch); a pull leaves that to the pulled ledger (it vouches by CRC-32)."""
        dest = self.local / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.pull-{uuid.uuid4().hex[:8]}")  # tasks may fetch at once
        try:
            pafs.copy_files(
                f"{self.root}/{rel}", str(tmp), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem()
            )
            if claim:
                adopt_file(dest, tmp)
            os.replace(tmp, dest)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)

    def pull_rest(self) -> None:
        """Fetch the data files a lazy :meth:`pull` left on the remote (still there, and not
        fetched since): the workers read this folder itself."""
        later, self._later = sorted(self._later), set()
        for rel in later:
            if (self.local / rel).exists() or self._stamp(rel) is None:
                continue
            self._download(rel)
            st = (self.local / rel).stat()
            self._sent[rel] = (st.st_size, st.st_mtime_ns)
        if later:
            log.info("%s: %d data file(s) fetched into %s", self.url, len(later), self.local)

    def drop_below(self, rel: str, keep: str | None) -> None:
        """Remove the remote files below folder ``rel`` (``""``: all) that no local copy stands for,
        under the tool's names, except folder ``keep`` (a name directly below ``rel``) and the logs:
        ``--overwrite`` with data files left on the remote by a lazy :meth:`pull`."""
        prefix = f"{rel}/" if rel else ""
        skip = tuple(f"{prefix}{n}/" for n in (keep, LOG_DIR) if n)
        for r in sorted(self._remote()):
            if not r.startswith(prefix) or r.startswith(skip) or (self.local / r).exists() or _skipped(r):
                continue
            if r.rsplit("/", 1)[-1] == LEDGER_NAME or not _ours(r):
                continue
            self.fs.delete_file(f"{self.root}/{r}")
            self._forget(r)

    def _local(self) -> dict[str, tuple[int, int]]:
        out = {}
        for path in self.local.rglob("*"):
            rel = path.relative_to(self.local).as_posix()
            if path.is_file() and not _skipped(rel):
                st = path.stat()
                out[rel] = (st.st_size, st.st_mtime_ns)
        return out

    def _upload(self, rel: str) -> None:
        self.fs.create_dir(f"{self.root}/{rel}".rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(
            str(self.local / rel),
            f"{self.root}/{rel}",
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self.fs,
        )

    def push(self, final: bool = False) -> int:
        """Bring the remote up to date (in the order of the module doc); returns files uploaded.

        The manifest is read before the folder is listed: every file it lists exists by then (a
        piece is recorded after its files are written), so every one is uploaded before it."""
        with self._lock:
            snapshot: dict[str, tuple[tuple[int, int], bytes]] = {}  # stamp (taken first) and content
            finals = _finals(self.local)
            for rel in finals:
                try:
                    st = (self.local / rel).stat()
                    snapshot[rel] = ((st.st_size, st.st_mtime_ns), (self.local / rel).read_bytes())
                except FileNotFoundError:
                    pass
            now = self._local()
            sent = 0
            if "_SUCCESS" not in snapshot and "_SUCCESS" in self._sent:
                self.fs.delete_file(f"{self.root}/_SUCCESS")
                del self._sent["_SUCCESS"]
            for rel, stamp in sorted(now.items()):
                if rel in finals or self._sent.get(rel) == stamp:
                    continue
                self._upload(rel)
                self._sent[rel] = stamp
                sent += 1
            if final:  # only what this job pulled or uploaded: a key someone else added meanwhile stays
                for rel in sorted(set(self._remote()) - set(now)):
                    if rel in self._sent and _ours(rel) and not _skipped(rel):
                        self.fs.delete_file(f"{self.root}/{rel}")
                        self._sent.pop(rel, None)
            for rel in finals:
                with self._finals:
                    if rel not in snapshot or self._sent.get(rel) == snapshot[rel][0]:
                        continue
                    if self._sent.get(rel, (0, -1))[1] > snapshot[rel][0][1]:
                        continue  # a newer one went up since the snapshot (staged per node: as it was saved)
                    with self.fs.open_output_stream(f"{self.root}/{rel}") as out:
                        out.write(snapshot[rel][1])
                    self._sent[rel] = snapshot[rel][0]
                    sent += 1
            return sent


_STAGED: list[StagedDir] = []  # the directories this process has staged, while their jobs run


def _unstage(d: StagedDir) -> None:
    _STAGED.remove(d)
    if nodes.active():
        nodes.activate(_STAGED)


def staged_dirs() -> list[StagedDir]:
    """The remote directories this process is staging now (for a job whose workers must each keep
    their own copy: :mod:`pipeline.io.nodes`)."""
    return list(_STAGED)


@contextlib.contextmanager
def staged(url: str, scratch_dir: str | None, interval: float = PUSH_INTERVAL, lease: bool = True) -> Iterator[Path]:
    """The local folder of remote directory ``url``, pulled first and pushed while the job runs
    and at its end (also when it fails, so the remote keeps every finished piece). ``lease``: hold
    the remote for this job alone (:meth:`StagedDir.take_lease`); a job that only reads it does not."""
    d = StagedDir(url, scratch_for(url, scratch_dir))
    if lease:
        d.take_lease()
    try:
        d.pull(lazy=True)
    except BaseException:
        d.release_lease()
        raise
    show_as(d.local, d.url)
    _STAGED.append(d)
    nodes.activate(_STAGED)  # data files are fetched when read, until the workers' view is known
    stop = threading.Event()

    def keep_pushing() -> None:
        while not stop.wait(interval):
            try:
                d.renew_lease()
                d.push()
            except OSError as exc:  # a transient network error: the next round or the final push retries
                log.warning("%s: upload failed (%s); retrying later", url, str(exc).splitlines()[0])

    pusher = threading.Thread(target=keep_pushing, name=f"push {url}", daemon=True)
    pusher.start()
    try:
        yield d.local
    except BaseException:
        _unstage(d)
        stop.set()
        pusher.join()
        try:  # keep what finished; the job's own error is the one to report
            d.push(final=True)
        except OSError as exc:
            log.warning("%s: the last upload failed too (%s)", url, str(exc).splitlines()[0])
        finally:
            d.release_lease()
        raise
    _unstage(d)
    stop.set()
    pusher.join()
    try:
        sent = d.push(final=True)
    finally:
        d.release_lease()
    log.info("%s: up to date (%d file(s) uploaded at the end)", url, sent)
