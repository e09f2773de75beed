"""One filesystem layer for every data path: local paths, `gs://`, `s3://`, `hf://`, `http(s)://`.

Why fsspec (and not etils.epath): fsspec is the layer h5py-, xarray-, zarr- and pandas-based readers
share, it is maintained with a release every month or so, and it gives the two things HDF5 needs
from an object store: byte-range reads (`cat_file(path, start, end)`) and listings, with one
implementation per store (gcsfs, s3fs, huggingface_hub's HfFileSystem, and HTTP in fsspec itself).
etils.epath wraps fsspec / tf.io.gfile for path manipulation but offers no range reads, so HDF5
would still go through fsspec underneath. The store packages are optional
(`pip install 'walrus_jax[remote]'`: gcsfs, s3fs, huggingface_hub, aiohttp); a URL whose package is
missing raises a ConfigError naming the URL and the package. Credentials are each store's usual
ones (application-default credentials for GCS, the AWS environment / profile for S3, HF_TOKEN or
`huggingface-cli login` for the hub).

Local paths take the same code as before this layer existed (os.path, glob, `h5py.File(path)`),
so they are not slower. Remote HDF5 files are opened from a `RemoteFile` (a seekable, read-only
file object that h5py reads through its file-object driver). Its reads are shaped by how a Well
window is read (each request to a store costs a round trip of tens of milliseconds):

* read-ahead: before h5py reads a window, `read_ahead` fetches the byte ranges of the window's
  frames in the contiguous field datasets (WellDataset computes them from the datasets' offsets)
  concurrently, in one round trip; h5py's reads are then served from memory, and the ranges
  dropped. Exactly the window's bytes are fetched, so bytes per host follow the rows it reads;
* small reads outside it (< block_size: HDF5's superblock, object headers, B-tree nodes and heaps,
  scalars, chunked datasets' small chunks) go through an LRU of aligned blocks, so a file's
  metadata costs a few requests once and neighbouring small reads share one request;
* other large reads (chunked datasets) are fetched exactly, in one request, and not cached: a
  window is read once per pass, so caching it would only evict the metadata.

Opened remote files are kept open per process (an LRU of MAX_OPEN handles), so reading a window
does not re-fetch the file's metadata; the cache is per process id (grain workers start empty).
Every remote HDF5 file a process opened (cached or not) is closed by an `atexit` hook, while the
interpreter still runs: left open, HDF5's own exit handler would close them after the interpreter
is gone and call into Python through the file-object driver (a segmentation fault at exit).
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import glob
import io
import os
import posixpath
import threading
import weakref
from typing import Iterator, Sequence

from walrus_jax.errors import ConfigError, DataError, PathError, UserError

BLOCK_SIZE = 512 * 1024  # bytes per cached block: reads below it are served from blocks
MAX_BLOCKS = 16  # cached blocks per open remote file (8 MiB)
MAX_OPEN = 32  # remote HDF5 files kept open per process (<= 256 MiB of blocks)
HDF5_SUFFIXES = (".hdf5", ".h5")

# protocol -> the package that implements it (the ConfigError's hint)
_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "s3a": "s3fs", "hf": "huggingface_hub",
             "http": "aiohttp", "https": "aiohttp"}


# ---------------------------------------------------------------------------------- paths
def is_remote(path) -> bool:
    """True for a URL with a scheme other than file:// (gs://, s3://, hf://, http(s)://, ...)."""
    p = os.fspath(path)
    return "://" in p and not p.startswith("file://")


def local(path) -> str:
    p = os.fspath(path)
    return p[len("file://"):] if p.startswith("file://") else p


def join(path, *parts: str) -> str:
    """os.path.join for local paths; '/'-joined for URLs."""
    if is_remote(path):
        return posixpath.join(os.fspath(path).rstrip("/"), *parts)
    return os.path.join(local(path), *parts)


def basename(path) -> str:
    return posixpath.basename(os.fspath(path).rstrip("/")) if is_remote(path) else os.path.basename(local(path))


def dirname(path) -> str:
    return posixpath.dirname(os.fspath(path).rstrip("/")) if is_remote(path) else os.path.dirname(local(path))


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def _fs(url: str):
    """(fsspec filesystem, path as that filesystem names it) for a URL."""
    import fsspec

    with errors(url):
        fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def _full(fs, name: str, like: str) -> str:
    """A listing entry as a URL of the same protocol as `like` (fsspec strips it for object stores)."""
    name = name.rstrip("/")
    return name if _is_http(like) else fs.unstrip_protocol(name)


# --------------------------------------------------------------------------------- errors
def _status(e: BaseException) -> int | None:
    """The HTTP status behind a store's exception, if any (fsspec's HTTP layer wraps a refused HEAD
    / GET in a FileNotFoundError whose cause holds it)."""
    seen = 0
    while e is not None and seen < 5:
        st = getattr(e, "status", None) or getattr(e, "code", None)
        if isinstance(st, int):
            return st
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _is_credentials(e: BaseException) -> bool:
    name = type(e).__name__.lower()
    return _status(e) in (401, 403) or isinstance(e, PermissionError) or \
        any(w in name for w in ("credential", "auth", "token", "forbidden"))


@contextlib.contextmanager
def errors(url: str) -> Iterator[None]:
    """Turns a store's exceptions into UserErrors that name the URL: missing bucket / object,
    refused credentials, a store package that is not installed, an unreachable server."""
    try:
        yield
    except UserError:
        raise
    except ImportError as e:
        proto = url.split("://", 1)[0]
        pkg = _PACKAGES.get(proto)
        how = f"{pkg} (pip install {pkg}, or pip install 'walrus_jax[remote]')" if pkg else \
            f"an fsspec implementation of {proto}://"
        raise ConfigError(f"{url}: reading {proto}:// needs {how}: {e}") from None
    except Exception as e:  # noqa: BLE001 - only store errors are translated, the rest re-raised
        name, status = type(e).__name__, _status(e)
        if _is_credentials(e):
            raise PathError(f"{url}: access denied; check this store's credentials "
                            f"({f'HTTP {status}, ' if status else ''}{name}: {e})") from None
        if isinstance(e, FileNotFoundError) and status in (None, 404):
            raise PathError(f"{url}: no such bucket, object or directory") from None
        if status is not None and status >= 400:
            raise PathError(f"{url}: the server answered HTTP {status} ({name}: {e})") from None
        if isinstance(e, OSError):  # connection refused, timeouts, DNS (aiohttp's are OSErrors)
            raise PathError(f"{url}: cannot be read ({name}: {e})") from None
        if isinstance(e, ValueError) and "protocol not known" in str(e).lower():
            raise ConfigError(f"{url}: unknown protocol {url.split('://', 1)[0]!r} (local paths, gs://, s3://, "
                              "hf://, http(s):// are supported)") from None
        raise


# ------------------------------------------------------------------------ queries, listing
def isdir(path) -> bool:
    if not is_remote(path):
        return os.path.isdir(local(path))
    fs, p = _fs(os.fspath(path))
    with errors(os.fspath(path)):
        try:
            return bool(fs.isdir(p))
        except FileNotFoundError:
            return False


def isfile(path) -> bool:
    if not is_remote(path):
        return os.path.isfile(local(path))
    url = os.fspath(path)
    fs, p = _fs(url)
    with errors(url):
        try:
            if _is_http(url):  # every HTTP URL "exists"; a directory is one that lists entries
                return bool(fs.exists(p)) and not fs.isdir(p)
            return bool(fs.isfile(p))
        except FileNotFoundError:
            return False


def listdir(path) -> list[tuple[str, bool]]:
    """Sorted (full path or URL, is a directory) of a folder's entries. Raises PathError if missing."""
    if not is_remote(path):
        d = local(path)
        if not os.path.isdir(d):
            raise PathError(f"{d}: no such directory")
        return [(os.path.join(d, n), os.path.isdir(os.path.join(d, n))) for n in sorted(os.listdir(d))]
    url = os.fspath(path)
    fs, p = _fs(url)
    with errors(url):
        entries = fs.ls(p, detail=True)
    out = {_full(fs, e["name"], url): e.get("type") == "directory" for e in entries}
    out.pop(url.rstrip("/"), None)  # some stores list a folder's own marker
    return sorted(out.items())


def list_files(folder, suffixes: Sequence[str] = HDF5_SUFFIXES) -> list[str]:
    """Sorted files of `folder` whose names end in one of `suffixes` (local: glob, as before)."""
    if not is_remote(folder):
        d = local(folder)
        return sorted(f for s in suffixes for f in glob.glob(os.path.join(d, "*" + s)))
    return [p for p, is_dir in listdir(folder) if not is_dir and p.endswith(tuple(suffixes))]


def open_text(path) -> io.TextIOBase:
    """A small text file (stats.yaml) opened for reading."""
    if not is_remote(path):
        return open(local(path))
    url = os.fspath(path)
    fs, p = _fs(url)
    with errors(url):
        return io.StringIO(fs.cat_file(p).decode())


# ---------------------------------------------------------------------------- remote HDF5
class RemoteFile(io.RawIOBase):
    """A read-only, seekable file object over a remote object (module doc: blocks and direct reads).

    Any error of the store is kept in `error` (h5py reports a failed read as a generic OSError;
    `open_h5` re-raises the kept one, which names the URL)."""

    def __init__(self, url: str, block_size: int = BLOCK_SIZE, max_blocks: int = MAX_BLOCKS):
        super().__init__()
        self.url = url
        self._fs, self._path = _fs(url)
        with errors(url):
            self.size = int(self._fs.size(self._path))
        self.block_size, self.max_blocks = int(block_size), int(max_blocks)
        self._blocks: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._ahead: dict[int, bytes] = {}  # start -> bytes fetched ahead for the read in progress
        self._ahead_lock = threading.Lock()
        self._pos = 0
        self.error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + int(offset))
        return self._pos

    def _fetch(self, start: int, end: int) -> bytes:
        try:
            with errors(self.url):
                data = self._fs.cat_file(self._path, start=start, end=end)
        except BaseException as e:
            self.error = e
            raise
        if len(data) != end - start:  # a server that ignores Range sends the whole object
            self.error = DataError(f"{self.url}: asked for bytes {start}-{end - 1} and got {len(data)} bytes; the "
                                   "server must support HTTP range requests")
            raise self.error
        return data

    @contextlib.contextmanager
    def reading_ahead(self, ranges: Sequence[tuple[int, int]]) -> Iterator[None]:
        """Fetches the byte ranges [start, end) concurrently (one round trip for all of them), serves
        the reads that fall inside them while the block runs, then drops them."""
        ranges = [(int(a), int(b)) for a, b in ranges if b > a]
        if not ranges:
            yield
            return
        try:
            with errors(self.url):
                got = self._fs.cat_ranges([self._path] * len(ranges), [a for a, _ in ranges],
                                          [b for _, b in ranges], on_error="raise")
        except BaseException as e:
            self.error = e
            raise
        for (a, b), data in zip(ranges, got):
            if len(data) != b - a:
                self.error = DataError(f"{self.url}: asked for bytes {a}-{b - 1} and got {len(data)} bytes; the "
                                       "server must support HTTP range requests")
                raise self.error
        with self._ahead_lock:
            self._ahead.update({a: data for (a, _), data in zip(ranges, got)})
        try:
            yield
        finally:
            with self._ahead_lock:
                for a, _ in ranges:
                    self._ahead.pop(a, None)

    def _from_ahead(self, start: int, n: int):
        with self._ahead_lock:
            for a, data in self._ahead.items():
                if a <= start and start + n <= a + len(data):
                    return memoryview(data)[start - a:start - a + n]
        return None

    def readinto(self, b) -> int:
        start = self._pos
        n = max(0, min(len(b), self.size - start))
        if n == 0:
            return 0
        out = memoryview(b).cast("B")
        ahead = self._from_ahead(start, n) if self._ahead else None
        if ahead is not None:
            out[:n] = ahead
        elif n >= self.block_size:
            out[:n] = self._fetch(start, start + n)
        else:
            bs = self.block_size
            first, last = start // bs, (start + n - 1) // bs
            missing = [i for i in range(first, last + 1) if i not in self._blocks]
            if missing:  # n < bs: at most two adjacent blocks, fetched in one request
                lo, hi = missing[0] * bs, min((missing[-1] + 1) * bs, self.size)
                data = self._fetch(lo, hi)
                for i in missing:
                    self._blocks[i] = data[i * bs - lo:(i + 1) * bs - lo]
            pos = 0
            for i in range(first, last + 1):
                self._blocks.move_to_end(i)
                blk = self._blocks[i]
                a = start + pos - i * bs
                take = min(len(blk) - a, n - pos)
                out[pos:pos + take] = blk[a:a + take]
                pos += take
            while len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)
        self._pos = start + n
        return n


_open_lock = threading.Lock()
_open_files: collections.OrderedDict = collections.OrderedDict()  # url -> (h5py.File, RemoteFile)
_open_pid = [os.getpid()]
_every_open: "weakref.WeakSet" = weakref.WeakSet()  # every remote h5py.File still alive (closed at exit)
_exit_hook = []  # [True] once the atexit hook is registered (a forked child inherits it)


def _close_at_exit(f) -> None:
    """Remembers an opened remote h5py.File for `close_every_remote_file` at interpreter exit."""
    with _open_lock:
        _every_open.add(f)
        if not _exit_hook:
            atexit.register(close_every_remote_file)
            _exit_hook.append(True)


def close_every_remote_file() -> None:
    """Closes every remote HDF5 file this process opened and still holds (the atexit hook; also
    safe to call at any time when no read is in flight)."""
    with _open_lock:
        files = list(_every_open) + [f for f, _ in _open_files.values()]
        _every_open.clear()
        _open_files.clear()
    for f in files:
        try:
            if f.id.valid:
                f.close()
        except Exception:  # noqa: BLE001 - at exit a file that will not close is left to HDF5
            pass


def _remote_h5(url: str):
    import h5py

    with _open_lock:
        if _open_pid[0] != os.getpid():  # a forked worker: the parent's handles are not ours to use
            _open_files.clear()
            _open_pid[0] = os.getpid()
        hit = _open_files.get(url)
        if hit is not None:
            _open_files.move_to_end(url)
            return hit
    raw = RemoteFile(url)
    try:
        f = h5py.File(raw, "r")
    except OSError as e:
        if raw.error is not None:
            raise raw.error from None
        raise DataError(f"{url}: not an HDF5 file or cannot be opened as one ({e})") from None
    _close_at_exit(f)
    with _open_lock:
        _open_files[url] = (f, raw)
        while len(_open_files) > MAX_OPEN:  # not closed here: another thread may be reading it;
            _open_files.popitem(last=False)  # the file closes when its last user drops it
    return f, raw


@contextlib.contextmanager
def open_h5(path) -> Iterator["h5py.File"]:  # noqa: F821
    """An HDF5 file opened for reading: a local path exactly as `h5py.File(path, "r")` (closed on
    exit); a URL through a cached RemoteFile (kept open for the next read of the same file)."""
    import h5py

    if not is_remote(path):
        with h5py.File(local(path), "r") as f:
            yield f
        return
    url = os.fspath(path)
    f, raw = _remote_h5(url)
    raw.error = None
    try:
        yield f
    except (OSError, KeyError, RuntimeError):
        if raw.error is not None:  # h5py words a failed fetch as a generic error: raise the store's
            with _open_lock:
                _open_files.pop(url, None)
            raise raw.error from None
        raise


def read_ahead(path, ranges: Sequence[tuple[int, int]]):
    """Inside `open_h5(path)`: a context in which the byte ranges [start, end) of a remote file were
    fetched concurrently (one round trip) and serve h5py's reads; for a local file nothing (the OS
    reads ahead)."""
    if not is_remote(path):
        return contextlib.nullcontext()
    with _open_lock:
        entry = _open_files.get(os.fspath(path))
    return contextlib.nullcontext() if entry is None else entry[1].reading_ahead(ranges)


def close_all() -> None:
    """Closes this process's cached remote HDF5 files (tests; freeing memory)."""
    with _open_lock:
        while _open_files:
            _open_files.popitem(last=False)[1][0].close()


__all__ = ["is_remote", "join", "basename", "dirname", "isdir", "isfile", "listdir", "list_files", "open_text",
           "open_h5", "read_ahead", "RemoteFile", "errors", "close_all",
           "close_every_remote_file", "BLOCK_SIZE", "MAX_OPEN"]
