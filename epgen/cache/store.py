"""Entries on disk: lookup with checksum verification, atomic publish, cross-process locks,
and maintenance (clear / gc) that touches only what epgen itself created.

Layout: <root>/<kernel name>.<key>/{kernel.cubin, manifest.json, source.cu, build.log};
<root>/.epgen-cache (the marker: written when epgen creates the cache), <root>/.tmp/ (entries
being built), <root>/.locks/ (one lock file per key), <root>/.trash/ (entries moved aside before
they are deleted or rebuilt), <root>/.failed/ (the whole log of each failed compile),
<root>/.pch/ (precompiled headers).

Permissions: everything is published with the creating process's umask (0755 / 0644 under the
usual 022), so a cache built by one user serves every user who can read it; a read-only cache
(mount or permissions) serves hits and is never written on a hit.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field

CUBIN, MANIFEST, SOURCE, LOG = "kernel.cubin", "manifest.json", "source.cu", "build.log"
ENTRY_FILES = (CUBIN, MANIFEST, SOURCE, LOG)
MARKER = ".epgen-cache"
# epgen's own folders inside a cache: removed by clear, emptied by gc, never entries.
OWN_DIRS = (".tmp", ".locks", ".trash", ".failed", ".pch", ".host")
# <kernel name>.<24 hex key>: kernel names are C++ identifiers (specs.KernelSpec.kernel_name).
ENTRY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\.[0-9a-f]{24}")
_PERMISSION = (errno.EACCES, errno.EPERM)


def default_root() -> str:
    return os.environ.get("EPGEN_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "epgen")


class CorruptEntry(RuntimeError):
    pass


class EntryUnreadable(RuntimeError):
    """An entry this user may not read: not corrupt, never moved aside or rebuilt over."""


class NotACacheError(RuntimeError):
    """`clear` was pointed at a folder epgen did not create as a cache."""


def _os_fix(e: OSError) -> str:
    """The fix for an OSError met on a cache path or a file the user named."""
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ("the folder is read-only for this user: pass --cache-dir (or EPGEN_CACHE_DIR) "
                "a writable folder, or ask its owner for write access")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full: free space (`epgen cache gc`) or pick another --cache-dir"
    if e.errno == errno.ENOENT:
        return "create the missing folder first, or give another path"
    if e.errno in (errno.ENOTDIR, errno.EISDIR):
        return "a file stands where a folder is needed (or the other way round): pick another path"
    return "check the path and its permissions"


def explain_os_error(e: OSError) -> str:
    """`<path>: <reason>; fix: <what to do>` (the CLI's one line for any OSError)."""
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}; fix: {_os_fix(e)}"


def umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


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


def unreadable_fix(path: str) -> str:
    return (f"{path}: not readable by this user (uid {os.getuid()}); its owner can run "
            f"`chmod -R a+rX {path}`, or point EPGEN_CACHE_DIR / --cache-dir at a cache of yours")


def check_manifest(manifest, where: str) -> None:
    """The fields ls, gc, lookup and import rely on, with their types; CorruptEntry if not."""
    if not isinstance(manifest, dict):
        raise CorruptEntry(f"{where}: manifest is not a JSON object")
    for fld, typ in (("name", str), ("key", str), ("cubin_sha256", str), ("cubin_bytes", int),
                     ("key_parts", dict), ("spec", dict), ("entries", list),
                     ("lowered_names", dict)):
        if not isinstance(manifest.get(fld), typ) or isinstance(manifest.get(fld), bool):
            raise CorruptEntry(f"{where}: manifest field {fld!r} missing or not a {typ.__name__}")
    for fld in ("created", "nvrtc_seconds", "link_seconds"):
        v = manifest.get(fld, 0)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise CorruptEntry(f"{where}: manifest field {fld!r} is not a number")


def parse_entry(where: str, dirname: str, manifest_bytes: bytes, cubin: bytes) -> dict:
    """The manifest of an entry named `dirname`, checked against its cubin; CorruptEntry."""
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptEntry(f"{where}: manifest is not valid JSON ({e})") from e
    check_manifest(manifest, where)
    if len(cubin) != manifest["cubin_bytes"]:
        raise CorruptEntry(f"{where}: cubin has {len(cubin)} bytes, manifest says "
                           f"{manifest['cubin_bytes']}")
    if sha256(cubin) != manifest["cubin_sha256"]:
        raise CorruptEntry(f"{where}: cubin checksum mismatch")
    if dirname != f"{manifest['name']}.{manifest['key']}":
        raise CorruptEntry(f"{where}: directory name does not match manifest name/key")
    return manifest


def read_entry(path: str) -> CacheEntry:
    """Load and verify one entry directory; CorruptEntry says what is wrong, EntryUnreadable
    that this user may not read it."""
    try:
        with open(os.path.join(path, MANIFEST), "rb") as f:
            manifest_bytes = f.read()
        with open(os.path.join(path, CUBIN), "rb") as f:
            cubin = f.read()
    except OSError as e:
        if e.errno in _PERMISSION:
            raise EntryUnreadable(unreadable_fix(path)) from e
        raise CorruptEntry(f"{path}: unreadable ({e.strerror}: {e.filename})") from e
    manifest = parse_entry(path, os.path.basename(os.path.normpath(path)), manifest_bytes, cubin)
    return CacheEntry(path, manifest, cubin)


def is_entry_dir(path: str) -> bool:
    """Whether a folder is one epgen published: its name is <kernel>.<key> and either its
    manifest names it so, or it holds nothing but entry files (a damaged entry)."""
    base = os.path.basename(os.path.normpath(path))
    if not ENTRY_RE.fullmatch(base) or os.path.islink(path) or not os.path.isdir(path):
        return False
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            m = json.load(f)
        if isinstance(m, dict) and f"{m.get('name')}.{m.get('key')}" == base:
            return True
    except PermissionError:
        return True      # named as one, and not this user's to read: listed as UNREADABLE
    except (OSError, ValueError):
        pass
    try:
        return set(os.listdir(path)) <= set(ENTRY_FILES)
    except OSError:
        return False


@dataclass
class Report:
    """What a maintenance command did: removed items, items it left (not epgen's), failures."""
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class Cache:
    def __init__(self, root: str | None = None):
        self.root = os.path.abspath(root or default_root())

    def entry_path(self, name: str, key: str) -> str:
        return os.path.join(self.root, f"{name}.{key}")

    @property
    def is_marked(self) -> bool:
        return os.path.isfile(os.path.join(self.root, MARKER))

    def _ensure_root(self) -> None:
        """Create the root; mark it as an epgen cache when epgen creates it, or when it holds
        nothing but epgen's things (a cache from before the marker)."""
        os.makedirs(self.root, exist_ok=True)
        if self.is_marked:
            return
        if all(n in OWN_DIRS or is_entry_dir(os.path.join(self.root, n))
               for n in os.listdir(self.root)):
            with open(os.path.join(self.root, MARKER), "w") as f:
                f.write("epgen kernel cache: `epgen cache clear` may empty this folder\n")

    def own_dir(self, sub: str) -> str:
        """One of OWN_DIRS, created (and the root marked) on first use."""
        self._ensure_root()
        d = os.path.join(self.root, sub)
        os.makedirs(d, exist_ok=True)
        return d

    # -- lookup ---------------------------------------------------------------------------
    def lookup(self, name: str, key: str) -> CacheEntry | None:
        """The verified entry, or None. A corrupt entry is moved aside (never loaded); an
        entry this user may not read raises EntryUnreadable (it is not compiled over)."""
        path = self.entry_path(name, key)
        if not os.path.isdir(path):
            return None
        try:
            return read_entry(path)
        except CorruptEntry:
            with contextlib.suppress(OSError):   # a read-only cache: leave it, compile fails
                self.discard(path)
            return None

    def discard(self, path: str) -> str | None:
        """Move an entry into .trash (atomic: it is gone from its place at once)."""
        trash = os.path.join(self.own_dir(".trash"),
                             f"{os.path.basename(path)}.{os.getpid()}.{time.time_ns()}")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return None
        return trash

    # -- publish --------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str, key: str, timeout_s: float):
        """Exclusive per-key lock across processes (and users); waits at most timeout_s."""
        path = os.path.join(self.own_dir(".locks"), f"{name}.{key}.lock")
        try:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
        except PermissionError:
            fd = os.open(path, os.O_RDONLY)   # another user's lock file: flock needs no write
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
                                           f"compile {name} (lock {path}); raise "
                                           "EPGEN_COMPILE_LOCK_TIMEOUT_S or remove a stale "
                                           "compile") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)   # releases the flock

    def publish(self, name: str, key: str, files: dict[str, bytes]) -> CacheEntry:
        """Write the entry into a temp dir, then rename it into place (atomic)."""
        tmp = tempfile.mkdtemp(prefix=f"{name}.{key}.", dir=self.own_dir(".tmp"))
        try:
            # mkdtemp makes 0700: publish with the umask like every other folder, so every
            # user who can read the cache can read the entry.
            os.chmod(tmp, 0o777 & ~umask())
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
    def _children(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        return sorted(os.path.join(self.root, d) for d in os.listdir(self.root)
                      if not d.startswith("."))

    def entries(self) -> list[str]:
        """Entry folders epgen published (see is_entry_dir); nothing else in the root."""
        return [p for p in self._children() if is_entry_dir(p)]

    def unknown(self) -> list[str]:
        """What the root holds that epgen did not create (left alone by clear and gc)."""
        return [p for p in self._children() if not is_entry_dir(p)]

    def find(self, key_or_name: str) -> list[str]:
        return [p for p in self.entries()
                if os.path.basename(p) == key_or_name
                or os.path.basename(p).rsplit(".", 1)[-1].startswith(key_or_name)
                or os.path.basename(p).rsplit(".", 1)[0] == key_or_name]

    def _remove(self, path: str, label: str, report: Report) -> None:
        """Move into .trash, then delete; a failure is recorded with its reason, never hidden."""
        try:
            trash = self.discard(path) if os.path.dirname(path) == self.root else path
            if trash:
                _rmtree(trash)
        except OSError as e:
            report.failed.append(f"{label}: {e.strerror or e} ({e.filename or path})")
            return
        report.removed.append(label)

    def clear(self) -> Report:
        """Remove every entry and epgen's own folders; refuses a folder without the marker."""
        report = Report()
        if not os.path.isdir(self.root):
            return report
        if not self.is_marked:
            raise NotACacheError(
                f"{self.root} is not an epgen cache (no {MARKER} marker, which epgen writes when "
                f"it creates a cache); nothing removed. `epgen cache gc` removes only epgen's "
                "entries from any folder")
        for p in self.entries():
            try:
                read_entry(p)
            except EntryUnreadable as e:    # not this user's to judge (or to move)
                report.failed.append(str(e))
                continue
            except CorruptEntry:
                pass
            self._remove(p, os.path.basename(p), report)
        for sub in OWN_DIRS:
            d = os.path.join(self.root, sub)
            if os.path.isdir(d) and not os.path.islink(d):
                try:
                    _rmtree(d)
                except OSError as e:
                    report.failed.append(f"{sub}: {e.strerror or e} ({e.filename or d})")
        report.kept = [os.path.basename(p) for p in self.unknown()]
        return report

    def gc(self, keep_signature: dict | None, max_age_days: float | None = None,
           stale_s: float = 3600) -> Report:
        """Remove corrupt entries, entries of another toolchain, old ones, and epgen's
        leftovers; list (and keep) whatever else the folder holds."""
        report = Report()
        now = time.time()
        for p in self.entries():
            reason = None
            try:
                m = read_entry(p).manifest
                parts = m["key_parts"]
                if keep_signature and any(parts.get(k) != v for k, v in keep_signature.items()):
                    reason = "other toolchain"
                elif max_age_days is not None and now - m.get("created", now) > max_age_days * 86400:
                    reason = "older than limit"
            except CorruptEntry:
                reason = "corrupt"
            except EntryUnreadable as e:
                report.failed.append(str(e))
            if reason:
                self._remove(p, f"{os.path.basename(p)} ({reason})", report)
        # .locks is left: a lock file's age says nothing about whether a compile holds it.
        for sub in (".tmp", ".trash", ".failed"):
            d = os.path.join(self.root, sub)
            if not os.path.isdir(d) or os.path.islink(d):
                continue
            for x in sorted(os.listdir(d)):
                full = os.path.join(d, x)
                try:
                    old = now - os.lstat(full).st_mtime > stale_s
                except FileNotFoundError:
                    continue
                # .trash: always; the others only when stale (a compile may be using them).
                if sub == ".trash" or old:
                    self._remove(full, f"{sub}/{x}", report)
        d = os.path.join(self.root, ".pch")
        if os.path.isdir(d) and not os.path.islink(d):
            for x in sorted(os.listdir(d)):
                if not _pch_in_use(x):
                    self._remove(os.path.join(d, x), f".pch/{x}", report)
        report.kept = [os.path.basename(p) for p in self.unknown()]
        return report


def _pch_in_use(name: str) -> bool:
    """A PCH file is named only while its process creates it (compiler.ensure_pch):
    prelude.<host>.<pid>.<tag>.pch; in use while that pid lives on this host. Anything else in
    .pch/ (a killed creation, the persistent PCHs of older epgen versions) is garbage."""
    parts = name.split(".")
    if len(parts) < 5 or parts[0] != "prelude" or parts[-1] != "pch" or not parts[-3].isdigit():
        return False
    host, pid = ".".join(parts[1:-3]), int(parts[-3])
    if host != socket.gethostname():
        return True          # another machine's (a shared cache): not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:                     # a killed process not yet reaped (a zombie) holds no file
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _rmtree(path: str) -> None:
    """Delete a file or folder, raising the first OSError (shutil's default)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)
