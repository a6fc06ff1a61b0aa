"""The cache commands touch only what epgen created, a cache serves every user who can read it
(read-only included), and maintenance says truthfully what it could not do. Real processes:
another user is uid 65534 (setpriv), a read-only cache is a real read-only tmpfs (unshare -m)."""
import os
import stat
import sys

import pytest

from epgen import jit
from epgen.cache import Cache
from epgen.cli import main
from epgen.jit.specs import LayoutSpec
from sandbox import as_nobody, epgen_argv, in_mount_namespace, shared_dir  # noqa: F401

SPEC = LayoutSpec(num_ranks=2, num_experts=32, num_topk=4)
OTHER = LayoutSpec(num_ranks=2, num_experts=32, num_topk=3)
HIT = """
import sys
from epgen import jit
from epgen.cache import Cache
from epgen.jit.specs import LayoutSpec
stats = {{}}
jit.build(LayoutSpec(num_ranks=2, num_experts=32, num_topk={k}), "sm_90", Cache(sys.argv[1]), stats)
print("CACHED" if stats["cached"] else "COMPILED")
"""


def build(root, spec=SPEC, umask=0o022):
    jit._memo.clear()
    old = os.umask(umask)
    try:
        return jit.build(spec, "sm_90", Cache(str(root)))
    finally:
        os.umask(old)


def tree(root) -> dict:
    """Every path below root with its content (files) or None (folders)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs:
            out[os.path.relpath(os.path.join(d, n), root)] = None
        for n in files:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root)] = f.read()
    return out


def make_home(home):
    """A folder a user might point --cache-dir at by mistake."""
    for rel, text in (("project/src/main.py", "print(1)\n"), ("photos/a.jpg", "jpeg"),
                      (".bashrc", "export X=1\n"), ("notes.txt", "mine"),
                      # named like an entry, but holding something epgen never writes
                      ("layout_k4_e32_r2_abcdef.0123456789abcdef01234567/thesis.tex", "\\begin")):
        p = os.path.join(home, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(text)


def test_clear_and_gc_leave_a_folder_that_is_not_a_cache_untouched(tmp_path, capsys):
    home = str(tmp_path / "home")
    make_home(home)
    before = tree(home)
    assert main(["--cache-dir", home, "cache", "clear"]) == 1
    err = capsys.readouterr().err
    assert "not an epgen cache" in err and "nothing removed" in err, err
    assert main(["--cache-dir", home, "cache", "gc"]) == 0
    out = capsys.readouterr().out
    assert "kept project (not created by epgen)" in out and "kept photos" in out, out
    assert "removed 0 items" in out
    assert tree(home) == before


def test_clear_and_gc_in_a_cache_remove_only_epgen_things(tmp_path, capsys):
    root = str(tmp_path / "cache")
    entry = build(root)
    assert os.path.isfile(os.path.join(root, ".epgen-cache")), "epgen marks the cache it creates"
    make_home(root)                                # the user's own things inside the cache
    mine = {k: v for k, v in tree(root).items() if not k.startswith(".") and
            not k.startswith(os.path.basename(entry.path))}
    damaged = os.path.join(root, f"{SPEC.name}.{'f' * 24}")
    os.makedirs(damaged)
    with open(os.path.join(damaged, "manifest.json"), "w") as f:
        f.write("{")                               # an entry of epgen's, damaged
    os.makedirs(os.path.join(root, ".tmp", "stale"))
    os.utime(os.path.join(root, ".tmp", "stale"), (0, 0))
    assert main(["--cache-dir", root, "cache", "gc"]) == 0
    out = capsys.readouterr().out
    assert f"removed {os.path.basename(damaged)} (corrupt)" in out and "removed .tmp/stale" in out
    assert os.path.isdir(entry.path) and not os.path.exists(damaged)
    assert main(["--cache-dir", root, "cache", "clear"]) == 0
    out = capsys.readouterr().out
    assert "removed 1 entries" in out and "kept project" in out, out
    after = tree(root)
    assert {k: v for k, v in after.items() if not k.startswith(".")} == mine
    assert not any(k.startswith((".tmp", ".locks", ".trash")) for k in after)


def test_a_cache_built_by_root_serves_another_user(shared_dir):  # noqa: F811
    root = os.path.join(shared_dir, "cache")
    build(root)
    r = as_nobody([sys.executable, "-c", HIT.format(k=4), root],
                  env=dict(__import__("sandbox").env(), EPGEN_JIT="0"))
    assert r.returncode == 0 and "CACHED" in r.stdout, r.stdout + r.stderr
    r = as_nobody(epgen_argv("--cache-dir", root, "cache", "ls"))
    assert r.returncode == 0 and "1 entries" in r.stdout, r.stdout + r.stderr
    assert "CORRUPT" not in r.stdout and "UNREADABLE" not in r.stdout
    # An entry its owner made private: named unreadable (with the fix), never compiled over.
    entry = build(root, OTHER)
    os.chmod(entry.path, 0o700)
    r = as_nobody(epgen_argv("--cache-dir", root, "cache", "ls"))
    assert "UNREADABLE" in r.stdout and "chmod -R a+rX" in r.stdout and "CORRUPT" not in r.stdout
    r = as_nobody([sys.executable, "-c", HIT.format(k=3), root])
    assert r.returncode != 0 and "not readable by this user" in r.stderr, r.stderr[-2000:]
    assert os.path.isdir(entry.path)


def test_a_writable_shared_cache_works_for_both_users(shared_dir):  # noqa: F811
    root = os.path.join(shared_dir, "cache")
    entry = build(root, umask=0)                  # a cache meant for a group: 0777 / 0666
    assert stat.S_IMODE(os.stat(entry.path).st_mode) == 0o777
    r = as_nobody([sys.executable, "-c", HIT.format(k=4), root])
    assert "CACHED" in r.stdout, r.stdout + r.stderr
    r = as_nobody([sys.executable, "-c", HIT.format(k=3), root], env=dict(
        __import__("sandbox").env(), EPGEN_PCH="0"))
    assert "COMPILED" in r.stdout, r.stdout + r.stderr
    jit._memo.clear()
    stats = {}
    jit.build(OTHER, "sm_90", Cache(root), stats)
    assert stats["cached"] is True


def test_read_only_cache_serves_hits_and_maintenance_says_it_removed_nothing(tmp_path):
    src = str(tmp_path / "cache")
    build(src)
    os.makedirs(os.path.join(src, ".trash", "left-over"))
    archive = str(tmp_path / "other.tar")
    other = str(tmp_path / "other")
    build(other, OTHER)
    from epgen.cache.transfer import export_cache
    export_cache(Cache(other), archive)
    py = f"{sys.executable} -m epgen --cache-dir $d"
    spec = tmp_path / "missing.yaml"      # a kernel the read-only cache lacks
    spec.write_text("kernels: [{family: layout, num_ranks: 2, num_experts: 32, num_topk: 2}]\n")
    r = in_mount_namespace(f"""
d=$(mktemp -d)
trap 'umount $d 2>/dev/null; rmdir $d' EXIT
mount -t tmpfs -o size=64m epgen-test $d
cp -a {src}/. $d/
mount -o remount,ro $d
EPGEN_JIT=0 $PY -c '{HIT.format(k=4)}' $d
{py} cache ls; echo "ls rc=$?"
{py} cache clear || echo "clear rc=$?"
{py} cache gc || echo "gc rc=$?"
{py} cache import {archive} || echo "import rc=$?"
{py} doctor || true
{py} precompile --spec {spec} --arch sm_90 --jobs 1 || echo "precompile rc=$?"
""")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "CACHED" in r.stdout and "ls rc=0" in r.stdout and "1 entries" in r.stdout, out
    assert "CORRUPT" not in out and "Traceback" not in out, out
    assert "clear rc=1" in r.stdout and "clear: removed 0 entries" in r.stdout, out
    assert "could not remove" in r.stderr and "Read-only file system" in r.stderr, out
    assert "gc rc=1" in r.stdout and "gc: removed 0 items" in r.stdout, out
    assert "import rc=1" in r.stdout and "epgen cache import: error:" in r.stderr
    assert "fix: the folder is read-only" in r.stderr, out
    assert "[ok] cache:" in r.stdout and "read-only (a deploy cache" in r.stdout, out
    assert "precompile rc=1" in r.stdout and "Read-only file system; fix: the folder is " \
        "read-only" in r.stderr.split("epgen precompile: 1 kernels", 1)[1], out


def test_doctor_judges_the_cache_path(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["--cache-dir", str(a_file), "doctor"]) == 1
    out = capsys.readouterr().out
    assert "[MISSING] cache:" in out and "is a file" in out, out
    assert main(["--cache-dir", str(tmp_path / "not" / "yet"), "doctor"]) == 0
    out = capsys.readouterr().out
    assert "[ok] cache:" in out and "does not exist yet" in out, out
