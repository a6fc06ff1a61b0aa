"""Move a cache between machines: export to one tar file, import with checksums verified."""
from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile

from .store import ENTRY_FILES, Cache, CorruptEntry, read_entry


def export_cache(cache: Cache, out_path: str, names: list[str] | None = None) -> int:
    """Write every valid entry (or those named) into a .tar(.gz) with an index; returns count."""
    count, index = 0, []
    mode = "w:gz" if out_path.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(out_path, mode) as tar:
        for path in cache.entries():
            base = os.path.basename(path)
            if names and base not in names:
                continue
            try:
                entry = read_entry(path)
            except CorruptEntry:
                continue
            for fname in ENTRY_FILES:
                tar.add(os.path.join(path, fname), arcname=f"{base}/{fname}")
            index.append({"entry": base, "cubin_sha256": entry.manifest["cubin_sha256"]})
            count += 1
        data = json.dumps({"format": "epgen-cache-export/1", "entries": index}, indent=1).encode()
        info = tarfile.TarInfo("INDEX.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return count


def import_cache(cache: Cache, in_path: str) -> tuple[int, list[str]]:
    """Verify each entry's checksum before publishing it; returns (imported, rejected)."""
    imported, rejected = 0, []
    with tarfile.open(in_path, "r:*") as tar, tempfile.TemporaryDirectory() as tmp:
        members = [m for m in tar.getmembers() if m.isfile()]
        for m in members:
            if m.name.startswith("/") or ".." in m.name.split("/"):
                raise ValueError(f"{in_path}: unsafe path in archive: {m.name!r}")
        tar.extractall(tmp, members=members, filter="data") if hasattr(tarfile, "data_filter") \
            else tar.extractall(tmp, members=members)
        for base in sorted(os.listdir(tmp)):
            src = os.path.join(tmp, base)
            if not os.path.isdir(src):
                continue
            try:
                entry = read_entry(src)
            except CorruptEntry as e:
                rejected.append(str(e))
                continue
            files = {}
            for fname in ENTRY_FILES:
                with open(os.path.join(src, fname), "rb") as f:
                    files[fname] = f.read()
            name, key = entry.manifest["name"], entry.manifest["key"]
            if cache.lookup(name, key) is None:
                cache.publish(name, key, files)
            imported += 1
    return imported, rejected
