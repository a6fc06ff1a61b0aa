"""`epgen cache import` trusts nothing: names outside the entry layout and epgen's own folders
are refused, malformed manifests are rejected at import (ls and gc never meet them), members are
size-checked as they stream in, and --verify recompiles each entry and refuses any whose cubin
differs, which catches an archive whose cubin and checksum were edited together."""
import hashlib
import io
import json
import os
import tarfile

import pytest

from epgen import jit
from epgen.cache import Cache
from epgen.cache import transfer
from epgen.cache.transfer import ImportRefused, export_cache, import_cache
from epgen.cli import main
from epgen.jit.specs import LayoutSpec

SPEC = LayoutSpec(num_ranks=2, num_experts=32, num_topk=4)


@pytest.fixture(scope="module")
def entry_files(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("import-src"))
    jit._memo.clear()
    entry = jit.build(SPEC, "sm_90", Cache(root))
    files = {n: open(os.path.join(entry.path, n), "rb").read() for n in os.listdir(entry.path)}
    return os.path.basename(entry.path), files


def tar_of(path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def entry_members(base, files, **replace):
    files = dict(files, **replace)
    return {f"{base}/{n}": d for n, d in files.items()}


@pytest.mark.parametrize("name", [".tmp/x/kernel.cubin", ".epgen-cache", ".locks/a.lock",
                                  "../escape/kernel.cubin", "/abs/kernel.cubin", "notes.txt",
                                  "not-an-entry/kernel.cubin"])
def test_names_outside_the_entry_layout_are_refused(tmp_path, entry_files, name):
    base, files = entry_files
    archive = tar_of(str(tmp_path / "a.tar"), {name: b"x", **entry_members(base, files)})
    dst = Cache(str(tmp_path / "dst"))
    with pytest.raises(ImportRefused) as e:
        import_cache(dst, archive)
    assert repr(name) in str(e.value) and "<kernel>.<key>/<entry file>" in str(e.value)
    assert not os.path.exists(os.path.join(dst.root, ".epgen-cache")) or dst.entries() == []


@pytest.mark.parametrize("edit", [
    lambda m: m.pop("key_parts"),
    lambda m: m.update(spec="layout"),
    lambda m: m.update(spec={"family": "layout", "num_ranks": 3, "num_experts": 32,
                             "num_topk": 4}),
    lambda m: m.update(created="yesterday"),
    lambda m: m.update(lowered_names=[]),
])
def test_malformed_manifests_are_rejected_at_import(tmp_path, entry_files, edit, capsys):
    base, files = entry_files
    manifest = json.loads(files["manifest.json"])
    edit(manifest)
    archive = tar_of(str(tmp_path / "a.tar"), entry_members(
        base, files, **{"manifest.json": json.dumps(manifest).encode()}))
    root = str(tmp_path / "dst")
    imported, rejected = import_cache(Cache(root), archive)
    assert imported == 0 and len(rejected) == 1 and "manifest" in rejected[0], rejected
    assert main(["--cache-dir", root, "cache", "ls"]) == 0
    assert main(["--cache-dir", root, "cache", "gc"]) == 0
    assert Cache(root).entries() == []


def test_members_are_size_checked_while_streaming(tmp_path, entry_files, monkeypatch):
    base, files = entry_files
    monkeypatch.setattr(transfer, "MAX_MEMBER_BYTES", 1 << 20)     # the limit, made small
    bomb = str(tmp_path / "bomb.tar.gz")
    with tarfile.open(bomb, "w:gz") as tar:      # 8 MB of zeros in a few KB
        info = tarfile.TarInfo(f"{base}/kernel.cubin")
        info.size = 8 << 20
        tar.addfile(info, io.BytesIO(bytes(8 << 20)))
    assert os.path.getsize(bomb) < 100_000
    with pytest.raises(ImportRefused, match="more than any entry file"):
        import_cache(Cache(str(tmp_path / "dst")), bomb)


def test_verify_refuses_a_cubin_edited_with_its_checksum(tmp_path, entry_files, capsys):
    base, files = entry_files
    cubin = bytearray(files["kernel.cubin"])
    cubin[-64] ^= 0x01
    manifest = json.loads(files["manifest.json"])
    manifest["cubin_sha256"] = hashlib.sha256(bytes(cubin)).hexdigest()
    forged = tar_of(str(tmp_path / "forged.tar"), entry_members(
        base, files, **{"kernel.cubin": bytes(cubin),
                        "manifest.json": json.dumps(manifest).encode()}))
    # Checksums only catch damage: the forged entry passes a plain import...
    assert import_cache(Cache(str(tmp_path / "plain")), forged) == (1, [])
    # ...and --verify, recompiling it here, refuses it.
    root = str(tmp_path / "verified")
    assert main(["--cache-dir", root, "cache", "import", forged, "--verify"]) == 1
    assert "recompiled cubin differs" in capsys.readouterr().err
    assert Cache(root).entries() == []
    genuine = str(tmp_path / "genuine.tar")
    tar_of(genuine, entry_members(base, files))
    assert main(["--cache-dir", root, "cache", "import", genuine, "--verify"]) == 0
    assert "each recompiled and byte-identical" in capsys.readouterr().out
    assert len(Cache(root).entries()) == 1


def test_verify_refuses_source_that_is_not_the_specs(tmp_path, entry_files):
    base, files = entry_files
    source = files["source.cu"] + b"\n// an extra line\n"
    archive = tar_of(str(tmp_path / "a.tar"), entry_members(base, files, **{"source.cu": source}))
    imported, rejected = import_cache(Cache(str(tmp_path / "dst")), archive, verify=True)
    assert imported == 0 and "not what epgen renders" in rejected[0]


def test_export_then_import_round_trip(tmp_path, entry_files):
    base, files = entry_files
    src = Cache(str(tmp_path / "src"))
    jit._memo.clear()
    jit.build(SPEC, "sm_90", src)
    archive = str(tmp_path / "c.tar.gz")
    assert export_cache(src, archive) == 1
    assert import_cache(Cache(str(tmp_path / "dst")), archive, verify=True) == (1, [])
