"""Entries on disk: lookup with checksum verification, atomic publish, cross-process locks.

Layout: <root>/<kernel name>.<key>/{kernel.cubin, manifest.json, source.cu, build.log};
<root>/.tmp/ (entries being built), <root>/.locks/ (one lock file per key), <root>/.trash/
(corrupt entries moved aside before they are rebuilt).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

CUBIN, MANIFEST, SOURCE, LOG = "kernel.cubin", "manifest.json", "source.cu", "build.log"
ENTRY_FILES = (CUBIN, MANIFEST, SOURCE, LOG)


def default_root() -> str:
    return os.environ.get("EPGEN_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "epgen")


class CorruptEntry(RuntimeError):
    pass


@dataclass
class CacheEntry:
    path: str
    manifest: dict
    cubin: bytes

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def key(self) -> str:
        return self.manifest["key"]

    def lowered(self, entry: str) -> str:
        return self.manifest["lowered_names"][entry]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_entry(path: str) -> CacheEntry:
    """Load and verify one entry directory; CorruptEntry says what is wrong."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        with open(os.path.join(path, CUBIN), "rb") as f:
            cubin = f.read()
    except (OSError, ValueError) as e:
        raise CorruptEntry(f"{path}: unreadable ({e})") from e
    if not isinstance(manifest, dict) or "cubin_sha256" not in manifest:
        raise CorruptEntry(f"{path}: manifest lacks cubin_sha256")
    if len(cubin) != manifest.get("cubin_bytes"):
        raise CorruptEntry(f"{path}: cubin has {len(cubin)} bytes, manifest says "
                           f"{manifest.get('cubin_bytes')}")
    if sha256(cubin) != manifest["cubin_sha256"]:
        raise CorruptEntry(f"{path}: cubin checksum mismatch")
    dirname = os.path.basename(os.path.normpath(path))
    if dirname != f"{manifest.get('name')}.{manifest.get('key')}":
        raise CorruptEntry(f"{path}: directory name does not match manifest name/key")
    return CacheEntry(path, manifest, cubin)


class Cache:
    def __init__(self, root: str | None = None):
        self.root = os.path.abspath(root or default_root())

    def entry_path(self, name: str, key: str) -> str:
        return os.path.join(self.root, f"{name}.{key}")

    def _dir(self, sub: str) -> str:
        d = os.path.join(self.root, sub)
        os.makedirs(d, exist_ok=True)
        return d

    # -- lookup ---------------------------------------------------------------------------
    def lookup(self, name: str, key: str) -> CacheEntry | None:
        """The verified entry, or None. A corrupt entry is moved aside (never loaded)."""
        path = self.entry_path(name, key)
        if not os.path.isdir(path):
            return None
        try:
            return read_entry(path)
        except CorruptEntry:
            self.discard(path)
            return None

    def discard(self, path: str) -> None:
        trash = os.path.join(self._dir(".trash"),
                             f"{os.path.basename(path)}.{os.getpid()}.{time.time_ns()}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, trash)

    # -- publish --------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str, key: str, timeout_s: float):
        """Exclusive per-key lock across processes; waits at most timeout_s."""
        path = os.path.join(self._dir(".locks"), f"{name}.{key}.lock")
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"waited {timeout_s:.0f}s for another process to "
                                           f"compile {name} (lock {path})") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)   # releases the flock

    def publish(self, name: str, key: str, files: dict[str, bytes]) -> CacheEntry:
        """Write the entry into a temp dir, then rename it into place (atomic)."""
        tmp = tempfile.mkdtemp(prefix=f"{name}.{key}.", dir=self._dir(".tmp"))
        try:
            for fname, data in files.items():
                with open(os.path.join(tmp, fname), "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            final = self.entry_path(name, key)
            if os.path.isdir(final):      # a stale/corrupt one (lookup already refused it)
                self.discard(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return read_entry(final)

    # -- inspection / maintenance ---------------------------------------------------------
    def entries(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        return sorted(os.path.join(self.root, d) for d in os.listdir(self.root)
                      if not d.startswith(".") and os.path.isdir(os.path.join(self.root, d)))

    def find(self, key_or_name: str) -> list[str]:
        return [p for p in self.entries()
                if os.path.basename(p) == key_or_name
                or os.path.basename(p).rsplit(".", 1)[-1].startswith(key_or_name)
                or os.path.basename(p).rsplit(".", 1)[0] == key_or_name]

    def clear(self) -> int:
        n = 0
        for p in self.entries():
            shutil.rmtree(p, ignore_errors=True)
            n += 1
        for sub in (".tmp", ".trash", ".locks", ".pch"):
            shutil.rmtree(os.path.join(self.root, sub), ignore_errors=True)
        return n

    def gc(self, keep_signature: dict | None, max_age_days: float | None = None) -> list[str]:
        """Remove corrupt entries, entries of another toolchain, old ones, and leftovers."""
        removed = []
        now = time.time()
        for p in self.entries():
            reason = None
            try:
                m = read_entry(p).manifest
                parts = m.get("key_parts", {})
                if keep_signature and any(parts.get(k) != v for k, v in keep_signature.items()):
                    reason = "other toolchain"
                elif max_age_days is not None and now - m.get("created", now) > max_age_days * 86400:
                    reason = "older than limit"
            except CorruptEntry:
                reason = "corrupt"
            if reason:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(f"{os.path.basename(p)} ({reason})")
        for sub in (".tmp", ".trash"):
            d = os.path.join(self.root, sub)
            if os.path.isdir(d):
                for x in os.listdir(d):
                    full = os.path.join(d, x)
                    if sub == ".trash" or now - os.path.getmtime(full) > 3600:
                        shutil.rmtree(full, ignore_errors=True)
                        removed.append(f"{sub}/{x}")
        return removed
