"""A cache folder for a model built once from a source file (the embedded SmolLM2 GGUF, whose
de-quantisation costs ~20-40 s a load): built into a temporary folder under a lock, checked,
then renamed into place, so a reader only ever sees a complete folder. Each folder is keyed by the
package version and the source file's SHA-256, and carries a manifest of every file's size and
CRC-32; a folder that does not match its manifest (truncated, edited, half-deleted) is rebuilt,
never loaded.

Where: $RECON_FAST_CACHE, else $XDG_CACHE_HOME/recon-fast, else ~/.cache/recon-fast.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from recon_fast._version import __version__

CACHE_ENV = "RECON_FAST_CACHE"
MANIFEST = "recon-fast-cache.json"
FORMAT = 1
_HASHES = "source-hashes.json"  # source file stat -> SHA-256, so a warm load never reads the source


class CacheUnavailable(OSError):
    """The cache folder cannot be created or written (read-only home, no space)."""


def cache_root() -> Path:
    """The folder that holds every cache entry (not created here)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "recon-fast"


def source_sha256(source: Path, root: Path) -> str:
    """The source file's SHA-256, remembered under `root` by (size, mtime, inode, ctime) so that a
    later call does not open the file: reading 100 MB costs more than the rest of a warm load."""
    stat = source.stat()
    key = f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}:{stat.st_ctime_ns}"
    memo_path = root / _HASHES
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if isinstance(memo, dict) and isinstance(memo.get(key), str):
        return memo[key]
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    memo = {key: digest.hexdigest()}  # one entry: a replaced source's old hash is dropped
    with contextlib.suppress(OSError):
        _write_atomic(memo_path, json.dumps(memo).encode())
    return memo[key]


def entry_name(kind: str, sha256: str) -> str:
    return f"{kind}-{__version__}-{sha256[:16]}"


def cached_folder(kind: str, source: Path, build: Callable[[Path], None], *,
                  root: Path | None = None) -> tuple[Path, bool]:
    """(the cache folder for `source`, whether it was built now). build(folder) writes the files
    into an empty temporary folder; the manifest is added and the folder renamed into place under
    a lock, so concurrent callers build it once and nobody reads a half-written one.
    CacheUnavailable when the root cannot be written."""
    root = cache_root() if root is None else root
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheUnavailable(f"cannot create the model cache {root}: {exc.strerror}") from None
    sha256 = source_sha256(source, root)
    final = root / entry_name(kind, sha256)
    if is_complete(final, sha256):
        return final, False
    with _locked(root / f"{final.name}.lock"):
        if is_complete(final, sha256):  # another process built it while we waited
            return final, False
        _clear_leftovers(root, final.name)
        building = root / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            building.mkdir()
            build(building)
            _write_manifest(building, sha256)
            if final.exists():  # stale or corrupt: out of the way first (rename cannot replace a folder)
                trash = root / f".{final.name}.{uuid.uuid4().hex[:8]}.trash"
                final.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            building.rename(final)
            _fsync_dir(root)
        except OSError as exc:
            raise CacheUnavailable(f"cannot write the model cache {root}: {exc}") from None
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return final, True


# Folders this process already checked, with the (size, mtime, inode) of each file at the check:
# a command checks the cache before the load (to know module names) and again in the load, and
# the CRC-32s of 540 MB cost ~0.2 s each time; a file changed since is checked again.
_checked: dict[tuple[Path, str], tuple] = {}


def is_complete(folder: Path, sha256: str) -> bool:
    """Whether `folder` holds exactly what its manifest lists (same sizes and CRC-32s) for this
    source and package version."""
    key = (folder, sha256)
    stamp = _stamps(folder)
    if stamp is not None and _checked.get(key) == stamp:
        return True
    complete = _check(folder, sha256)
    if complete and stamp is not None:
        _checked[key] = stamp
    else:
        _checked.pop(key, None)
    return complete


def _stamps(folder: Path) -> tuple | None:
    try:
        return tuple(sorted((p.name, st.st_size, st.st_mtime_ns, st.st_ino)
                            for p in folder.iterdir() for st in (p.stat(),)))
    except OSError:
        return None


def _check(folder: Path, sha256: str) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or \
            manifest.get("source_sha256") != sha256 or manifest.get("recon_fast_version") != __version__:
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, expected in files.items():
        path = folder / name
        try:
            if path.stat().st_size != expected["size"] or _crc32(path) != expected["crc32"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


def _write_manifest(folder: Path, sha256: str) -> None:
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files[path.name] = {"size": path.stat().st_size, "crc32": _crc32(path)}
    manifest = {"format": FORMAT, "recon_fast_version": __version__, "source_sha256": sha256, "files": files}
    _write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1).encode())


def _crc32(path: Path) -> int:
    """CRC-32 of a file: 0.3 s for SmolLM2's 540 MB of weights, where SHA-256 takes 1.4 s."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def _clear_leftovers(root: Path, name: str) -> None:
    """Temporary folders of builds that died (killed, out of space); called under the lock, so
    none of them is still being written."""
    for path in root.glob(f".{name}.*"):
        if path.suffix in (".tmp", ".trash") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock: released by the kernel if the holder dies)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
