"""Where run directories live: a local (or NFS) folder, or a URI of any filesystem ``pyarrow.fs`` supports
(``s3://bucket/runs``, ``gs://…``, ``abfs://…``, ``hdfs://…``).

``StoragePath`` is a path on one of them with the part of ``pathlib.Path``'s interface the run directory needs
(``/``, ``name``, ``parent``, ``exists``, ``read_text``, ``write_text``, ``glob``, ``iterdir``, ``unlink``, …) plus
``rmtree`` and ``upload``. A local ``StoragePath`` is also ``os.PathLike``, so third-party code that takes a path
(pandas, matplotlib, PEFT) works on it unchanged; a remote one refuses ``os.fspath`` with an error naming the caller's
mistake, so a write meant for the bucket never lands in a local folder by accident. Libraries that read and write
through a filesystem get ``sp.fs`` and ``sp.path`` (``pq.read_table(sp.path, filesystem=sp.fs)``); Ray Train/Tune
and Ray Data take ``str(sp)``, the URI.

What object storage lacks, and what we do instead:

* **No append**: ``metrics.jsonl`` becomes numbered part objects (``medvqa.runs.append_metrics``).
* **No rename**: a write is one PUT, which is atomic (a reader sees the old object or the new one, never half); a
  local write goes to a temp file renamed over the target, as before.
* **No folders**: ``mkdir`` does nothing remotely; a folder exists when an object lies under it.
* **Libraries that need local files** (``from_pretrained``, matplotlib, SQLite): ``local_copy`` downloads a folder or
  file once into a cache under the temp dir keyed by its URI and listing (``MEDVQA_STORAGE_CACHE`` overrides the
  place), ``staged`` gives a local folder whose files are uploaded when the block ends, and ``mirrored_file`` a
  local file (a command's log) uploaded when the command ends.

S3-compatible endpoints (MinIO, Ceph, a local test server) come from the standard ``AWS_ENDPOINT_URL``; credentials
and region from the usual AWS variables or instance roles (pyarrow's S3 client reads them). S3, GCS and Azure Blob
are strongly consistent for read-after-write and listings, which the run directory relies on (a resumed run lists
its metrics parts and checkpoints right after another process wrote them).

This module imports neither torch nor ray; pyarrow is imported on first use.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import logging
import os
import posixpath
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

CACHE_ENV = "MEDVQA_STORAGE_CACHE"
"""Folder for ``local_copy``'s downloads (default: ``<temp dir>/medvqa-storage-cache``)."""


def is_uri(location: str | os.PathLike) -> bool:
    """Whether ``location`` names object storage (``scheme://…``), not a local path (``file://`` is local)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


@functools.lru_cache(maxsize=None)
def _filesystem(root: str):
    """The pyarrow filesystem of a URI's scheme and authority (``s3://bucket``) and the path its root maps to, made
    once per process: resolving one may cost a request (S3 looks up the bucket's region)."""
    from pyarrow.fs import FileSystem

    return FileSystem.from_uri(root)


@functools.lru_cache(maxsize=None)
def _local_filesystem():
    from pyarrow.fs import LocalFileSystem

    return LocalFileSystem()


class StoragePath:
    """A file or folder on local disk or in object storage. ``str()`` is the location as written (an absolute local
    path, or the URI); equal locations compare equal. Build one with ``StoragePath(x)`` from a path, a URI, another
    ``StoragePath`` or a ``RunDir``."""

    __slots__ = ("uri",)

    def __init__(self, location: str | os.PathLike | StoragePath):
        if not isinstance(location, StoragePath) and isinstance(getattr(location, "path", None), StoragePath):
            location = location.path  # a RunDir
        if isinstance(location, StoragePath):
            uri = location.uri
        else:
            text = str(location) if isinstance(location, str) else os.fspath(location)
            if text.startswith("file://"):
                text = urlsplit(text).path
            if is_uri(text):
                parts = urlsplit(text)
                path = posixpath.normpath(parts.path) if parts.path not in ("", "/") else ""
                uri = f"{parts.scheme}://{parts.netloc}{path if path != '.' else ''}"
                if parts.query:
                    uri += f"?{parts.query}"
            else:
                uri = os.path.abspath(os.path.expanduser(text))
        object.__setattr__(self, "uri", uri)

    def __setattr__(self, key, value):
        raise AttributeError("StoragePath is immutable")

    def __reduce__(self):
        return StoragePath, (self.uri,)

    # ------------------------------------------------------------------------------------------ naming

    @property
    def is_local(self) -> bool:
        return not is_uri(self.uri)

    def _split(self) -> tuple[str, str, str]:
        """(``scheme://authority``, path below it, ``?query`` or '') of a remote location."""
        parts = urlsplit(self.uri)
        return f"{parts.scheme}://{parts.netloc}", parts.path, f"?{parts.query}" if parts.query else ""

    @property
    def _posix(self) -> str:
        return self.uri if self.is_local else self._split()[1]

    def _with_posix(self, posix: str) -> StoragePath:
        if self.is_local:
            return StoragePath(posix)
        root, _, query = self._split()
        return StoragePath(f"{root}{posix}{query}")

    def __truediv__(self, other: str | os.PathLike) -> StoragePath:
        other = str(other) if isinstance(other, str) else os.fspath(other)
        if other.startswith("/") or is_uri(other):
            raise ValueError(f"{self} / {other!r}: join a relative path")
        return self._with_posix(posixpath.join(self._posix or "/", other))

    def joinpath(self, *others: str) -> StoragePath:
        out = self
        for other in others:
            out = out / other
        return out

    @property
    def name(self) -> str:
        return posixpath.basename(self._posix.rstrip("/"))

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def parent(self) -> StoragePath:
        return self._with_posix(posixpath.dirname(self._posix.rstrip("/")) or "/")

    def with_suffix(self, suffix: str) -> StoragePath:
        return self.parent / (self.stem + suffix)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in self._posix.split("/") if p)

    def relative_to(self, other: str | os.PathLike | StoragePath) -> Path:
        """The path below ``other`` (as a relative ``Path``); ValueError when this is not inside it."""
        other = StoragePath(other)
        base = other._posix.rstrip("/")
        same_root = self.is_local == other.is_local and (self.is_local or self._split()[0] == other._split()[0])
        if not same_root or not (self._posix == other._posix or self._posix.startswith(base + "/")):
            raise ValueError(f"{self} is not inside {other}")
        return Path(self._posix[len(base):].lstrip("/") or ".")

    def as_posix(self) -> str:
        return self.uri

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"StoragePath({self.uri!r})"

    def __eq__(self, other) -> bool:
        """Equal to a ``StoragePath`` of the same location, and (local only) to an ``os.PathLike`` naming it."""
        if isinstance(other, StoragePath):
            return other.uri == self.uri
        if isinstance(other, os.PathLike) and self.is_local:
            return os.path.abspath(os.fspath(other)) == self.uri
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.uri)

    def __lt__(self, other: StoragePath) -> bool:
        return self.uri < other.uri

    def __fspath__(self) -> str:
        if not self.is_local:
            raise TypeError(f"{self} is in object storage, not a local path: read and write it through "
                            f"medvqa.storage (StoragePath methods, .fs/.path, local_copy or staged)")
        return self.uri

    @property
    def local(self) -> Path:
        """The local ``Path`` (TypeError for object storage)."""
        return Path(os.fspath(self))

    # ------------------------------------------------------------------------------------------ filesystem

    @property
    def fs(self):
        """The ``pyarrow.fs.FileSystem`` holding this path (see ``path``)."""
        if self.is_local:
            return _local_filesystem()
        root, _, query = self._split()
        return _filesystem(root + "/" + query)[0]

    @property
    def path(self) -> str:
        """This location as a path on ``fs`` (``bucket/key`` on S3)."""
        if self.is_local:
            return self.uri
        root, posix, query = self._split()
        base = _filesystem(root + "/" + query)[1].rstrip("/")
        return f"{base}/{posix.lstrip('/')}".rstrip("/") if posix.strip("/") else base

    def _info(self):
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        from pyarrow.fs import FileType

        return self._info().type != FileType.NotFound

    def is_dir(self) -> bool:
        from pyarrow.fs import FileType

        return self._info().type == FileType.Directory

    def is_file(self) -> bool:
        from pyarrow.fs import FileType

        return self._info().type == FileType.File

    def stat(self):
        """``os.stat`` of a local path; for an object, its ``st_size`` and ``st_mtime_ns``."""
        if self.is_local:
            return os.stat(self.uri)
        from types import SimpleNamespace

        from pyarrow.fs import FileType

        info = self._info()
        if info.type == FileType.NotFound:
            raise FileNotFoundError(str(self))
        return SimpleNamespace(st_size=info.size, st_mtime_ns=info.mtime_ns)

    def mtime_ns(self) -> int | None:
        """Last modification (ns since the epoch), None when it does not exist."""
        from pyarrow.fs import FileType

        info = self._info()
        return None if info.type == FileType.NotFound else info.mtime_ns

    def read_bytes(self) -> bytes:
        if self.is_local:
            return self.local.read_bytes()
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as e:
            if not self.exists():
                raise FileNotFoundError(f"{self}: no such object") from e
            raise

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        """Atomic: a temp file renamed over the target locally, one PUT in object storage."""
        if not self.is_local:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
            return
        target = self.local
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        """Create the folder locally; nothing in object storage (a prefix exists once an object lies under it)."""
        if self.is_local:
            self.local.mkdir(parents=parents, exist_ok=exist_ok)

    def iterdir(self) -> list[StoragePath]:
        """Direct children (files and folders), sorted; [] when this is not a folder."""
        return sorted(self / posixpath.basename(i.path.rstrip("/")) for i in self._walk(recursive=False))

    def _walk(self, recursive: bool = True) -> list:
        """Everything below this folder (or its direct children only)."""
        from pyarrow.fs import FileSelector

        return self.fs.get_file_info(FileSelector(self.path, recursive=recursive, allow_not_found=True))

    def glob(self, pattern: str) -> list[StoragePath]:
        """Entries whose path below this folder matches ``pattern`` segment by segment (``*.parquet``,
        ``*/params.json``; no ``**``), sorted."""
        want = pattern.split("/")
        base = self.path.rstrip("/") + "/"
        out = []
        for info in self._walk(recursive=len(want) > 1):
            rel = info.path[len(base):].split("/") if info.path.startswith(base) else []
            if len(rel) == len(want) and all(fnmatch.fnmatchcase(r, w) for r, w in zip(rel, want)):
                out.append(self.joinpath(*rel))
        return sorted(out)

    def rglob_files(self) -> list[StoragePath]:
        """Every file below this folder, sorted by path."""
        from pyarrow.fs import FileType

        base = self.path.rstrip("/") + "/"
        return sorted(self.joinpath(*i.path[len(base):].split("/")) for i in self._walk() if i.type == FileType.File)

    def unlink(self, missing_ok: bool = False) -> None:
        if not self.exists():
            if missing_ok:
                return
            raise FileNotFoundError(str(self))
        self.fs.delete_file(self.path)

    def rmtree(self) -> None:
        """Delete this folder and everything below it (nothing when it does not exist)."""
        if self.is_dir():
            self.fs.delete_dir(self.path)

    # ------------------------------------------------------------------------------------------ copies

    def upload(self, local_dir: str | os.PathLike, last: Sequence[str] = ()) -> None:
        """Copy the files of the local folder ``local_dir`` into this folder (overwriting). Files named in ``last``
        go last: a reader that takes one of them as the sign that the folder is complete never sees it early."""
        local_dir = Path(local_dir)
        if self.is_local and self.local.resolve() == local_dir.resolve():
            return
        files = sorted((f for f in local_dir.rglob("*") if f.is_file()),
                       key=lambda f: (f.name in last, f.relative_to(local_dir).as_posix()))
        for f in files:
            (self / f.relative_to(local_dir).as_posix()).write_bytes(f.read_bytes())

    def fingerprint(self) -> str:
        """A hash of what is here: each file's relative path, size and modification time (a file: its own)."""
        from pyarrow.fs import FileType

        info = self._info()
        if info.type == FileType.NotFound:
            raise FileNotFoundError(f"{self}: not found")
        infos = [info] if info.type == FileType.File else [i for i in self._walk() if i.type == FileType.File]
        base = self.path.rstrip("/")
        h = hashlib.sha256()
        for i in sorted(infos, key=lambda i: i.path):
            h.update(f"{i.path[len(base):]}\0{i.size}\0{i.mtime_ns}\n".encode())
        return h.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "medvqa-storage-cache")


def local_copy(location: str | os.PathLike | StoragePath) -> Path:
    """A local path holding ``location`` (a file or folder) for code that can only read local files
    (``from_pretrained`` of an adapter or model in a bucket): a local location as it is; a remote one downloaded once
    into ``cache_root()/<hash of URI and listing>/<name>`` (a changed object gets a new copy). Safe when several
    processes of a node ask at once: each downloads into its own temp folder, the first rename wins."""
    sp = StoragePath(location)
    if sp.is_local:
        return sp.local
    key = hashlib.sha256(f"{sp.uri}\n{sp.fingerprint()}".encode()).hexdigest()[:20]
    final = cache_root() / key / (sp.name or "root")
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".download-"))
    try:
        if sp.is_file():
            (tmp / "f").write_bytes(sp.read_bytes())
            src = tmp / "f"
        else:
            src = tmp / "d"
            for f in sp.rglob_files():
                dest = src / f.relative_to(sp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(f.read_bytes())
        try:
            os.rename(src, final)
        except OSError:
            if not final.exists():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextmanager
def mirrored_file(location: str | os.PathLike | StoragePath) -> Iterator[Path]:
    """A local file for a writer that appends to it (a command's log): ``location`` itself when local; else a file
    in the cache, starting with the object's content if it exists, uploaded to ``location`` when the block ends,
    with or without an error (a killed process leaves it in the cache)."""
    sp = StoragePath(location)
    if sp.is_local:
        sp.parent.mkdir()
        yield sp.local
        return
    local = cache_root() / "files" / hashlib.sha256(sp.uri.encode()).hexdigest()[:20] / sp.name
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(sp.read_bytes() if sp.is_file() else b"")
    try:
        yield local
    finally:
        try:
            sp.write_bytes(local.read_bytes())
        except OSError as e:  # never hide the block's own error behind an upload failure
            log.warning("could not upload %s to %s: %s", local, sp, e)


@contextmanager
def staged(location: str | os.PathLike | StoragePath, last: Sequence[str] = ()) -> Iterator[Path]:
    """A local folder for writers that need one (``save_pretrained``, matplotlib, a report): ``location`` itself when
    it is local, else a temp folder whose files are uploaded to ``location`` when the block ends without an error
    (``last``: as in ``StoragePath.upload``)."""
    sp = StoragePath(location)
    if sp.is_local:
        sp.mkdir()
        yield sp.local
        return
    tmp = Path(tempfile.mkdtemp(prefix="medvqa-staged-"))
    try:
        yield tmp
        sp.upload(tmp, last=last)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
