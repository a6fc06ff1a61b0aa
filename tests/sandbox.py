"""Real processes as another user and real mounts for the cache tests, leaving nothing behind.

- `as_nobody(argv)` runs argv as uid/gid 65534 (setpriv; no account is created).
- `in_mount_namespace(script)` runs a shell script in a private mount namespace (unshare -m):
  the tmpfs it mounts vanishes with the namespace when the script ends, whatever happens.
- `shared_dir()` makes a folder every user may read (pytest's tmp_path is 0700 root's).
Each skips the calling test, with the reason, where the facility is missing.
"""
import functools
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

import epgen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.dirname(os.path.dirname(os.path.abspath(epgen.__file__)))   # the epgen under test
NOBODY = 65534


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("EPGEN_")}
    e.update(PYTHONPATH=SRC, HOME="/nonexistent", **extra)
    return e


def epgen_argv(*args) -> list[str]:
    return [sys.executable, "-m", "epgen", *args]


def run(argv, timeout=300, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("env", env())
    # cwd: `python -m` puts it first on sys.path; SRC keeps the epgen under test the one run
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=SRC, **kw)


@functools.lru_cache(maxsize=None)
def _can_setpriv() -> str:
    if os.geteuid() != 0:
        return "needs root (to run a process as uid 65534)"
    if not shutil.which("setpriv"):
        return "setpriv (util-linux) is not installed"
    r = subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                        "--clear-groups", sys.executable, "-c", "import epgen"],
                       capture_output=True, text=True, env=env(), cwd="/")
    return "" if r.returncode == 0 else f"uid 65534 cannot run this Python/epgen: {r.stderr[-300:]}"


@functools.lru_cache(maxsize=None)
def _can_unshare() -> str:
    if os.geteuid() != 0:
        return "needs root (for a private mount namespace)"
    if not shutil.which("unshare"):
        return "unshare (util-linux) is not installed"
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        "d=$(mktemp -d) && mount -t tmpfs -o size=1m t $d && umount $d; "
                        "rc=$?; rmdir $d; exit $rc"], capture_output=True, text=True)
    return "" if r.returncode == 0 else f"cannot mount a tmpfs in a mount namespace: {r.stderr}"


def require_nobody() -> None:
    reason = _can_setpriv()
    if reason:
        pytest.skip(reason)


def require_mounts() -> None:
    reason = _can_unshare()
    if reason:
        pytest.skip(reason)


def as_nobody(argv, **kw) -> subprocess.CompletedProcess:
    require_nobody()
    return run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
                *argv], **kw)


def in_mount_namespace(script: str, **kw) -> subprocess.CompletedProcess:
    """`set -e` shell script in its own mount namespace; $PY is this Python."""
    require_mounts()
    return run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                f"set -e\nPY={sys.executable}\n{script}"], **kw)


@pytest.fixture
def shared_dir():
    d = tempfile.mkdtemp(prefix="epgen-test-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)
