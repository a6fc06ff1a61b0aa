"""Move a cache between machines: export to one tar file; import trusting nothing in it.

Import streams the archive (never unpacks it anywhere first): each member must be
`<kernel>.<key>/<entry file>` (or INDEX.json) of bounded size, each entry's manifest must be
complete and match its cubin's checksum, then the entry is published like a fresh compile.
Checksums only prove the bytes were not damaged in transit: whoever wrote the archive could have
edited cubin and checksum together. `verify=True` closes that: epgen's builds are deterministic,
so each entry is recompiled from its stored source and spec here and refused unless the source
is what epgen renders for the spec, the key is what this toolchain gives it, and the cubins are
byte-identical.
"""
from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import tarfile
import zlib

from .store import (CUBIN, ENTRY_FILES, ENTRY_RE, MANIFEST, SOURCE, Cache, CorruptEntry,
                    EntryUnreadable, parse_entry, read_entry)

INDEX = "INDEX.json"
MAX_MEMBER_BYTES = 256 << 20     # a cubin is a few MB; anything bigger is not an entry file


class ImportRefused(ValueError):
    """The archive as a whole cannot be imported (unsafe or unreadable): names it and why."""


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
            except (CorruptEntry, EntryUnreadable):
                continue
            for fname in ENTRY_FILES:
                tar.add(os.path.join(path, fname), arcname=f"{base}/{fname}")
            index.append({"entry": base, "cubin_sha256": entry.manifest["cubin_sha256"]})
            count += 1
        data = json.dumps({"format": "epgen-cache-export/1", "entries": index}, indent=1).encode()
        info = tarfile.TarInfo(INDEX)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return count


def _member_place(m: tarfile.TarInfo, in_path: str) -> tuple[str, str] | None:
    """(entry dir, file name) of an archive member; None for the index and plain folders;
    ImportRefused for anything that is not an entry file."""
    name = m.name[2:] if m.name.startswith("./") else m.name
    name = name.rstrip("/") if m.isdir() else name
    if name == INDEX and m.isfile():
        return None
    parts = name.split("/")
    if m.isdir() and len(parts) == 1 and ENTRY_RE.fullmatch(parts[0]):
        return None
    if not (m.isfile() and len(parts) == 2 and ENTRY_RE.fullmatch(parts[0])
            and parts[1] in ENTRY_FILES):
        kind = "file" if m.isfile() else "folder" if m.isdir() else "link or special file"
        raise ImportRefused(f"{in_path}: member {m.name[:120]!r} ({kind}) is not "
                            "<kernel>.<key>/<entry file>; nothing after it was imported")
    if m.size > MAX_MEMBER_BYTES:
        raise ImportRefused(f"{in_path}: member {m.name[:120]!r} is {m.size} bytes, more than "
                            f"any entry file ({MAX_MEMBER_BYTES} bytes)")
    return parts[0], parts[1]


def _check_entry(base: str, files: dict[str, bytes], where: str) -> dict:
    """The entry's manifest, checked so that ls / gc / lookup can rely on it; CorruptEntry."""
    missing = [f for f in ENTRY_FILES if f not in files]
    if missing:
        raise CorruptEntry(f"{where}: missing {missing}")
    manifest = parse_entry(where, base, files[MANIFEST], files[CUBIN])
    from ..jit.specs import SpecError, spec_from_json
    try:
        spec = spec_from_json(manifest["spec"])
    except (SpecError, TypeError, KeyError) as e:
        raise CorruptEntry(f"{where}: manifest spec is not a valid kernel spec ({e})") from e
    if spec.name != manifest["name"]:
        raise CorruptEntry(f"{where}: manifest spec gives kernel {spec.name}, not "
                           f"{manifest['name']}")
    if not isinstance(manifest["key_parts"].get("arch"), str):
        raise CorruptEntry(f"{where}: manifest key_parts lack the arch")
    return manifest


def verify_by_recompiling(manifest: dict, files: dict[str, bytes], where: str) -> None:
    """Refuse (CorruptEntry) unless recompiling the stored source here gives the same bytes."""
    from ..jit import codegen, compiler, toolchain
    from ..jit.specs import spec_from_json
    from .key import cache_key, key_parts
    spec = spec_from_json(manifest["spec"])
    arch = manifest["key_parts"]["arch"]
    source = files[SOURCE].decode("utf-8", errors="replace")
    if source != codegen.render(spec):
        raise CorruptEntry(f"{where}: stored source is not what epgen renders for its spec")
    tc = toolchain.discover()
    parts = key_parts(source, compiler.recipe(arch), tc.signature(),
                      codegen.TEMPLATES_DIR, codegen.header_files())
    if cache_key(parts) != manifest["key"]:
        raise CorruptEntry(f"{where}: key {manifest['key']} is not what this epgen and toolchain "
                           f"give its spec ({cache_key(parts)}): built elsewhere, cannot verify")
    result = compiler.compile_source(source, codegen.source_filename(spec), arch, tc,
                                     [spec.entry(k) for k in spec.entry_kinds], spec.describe())
    if result.cubin != files[CUBIN]:
        raise CorruptEntry(f"{where}: recompiled cubin differs from the archive's")


def import_cache(cache: Cache, in_path: str, verify: bool = False) -> tuple[int, list[str]]:
    """Publish each entry that passes its checks; returns (imported, rejected reasons)."""
    imported, rejected = 0, []
    pending: dict[str, dict[str, bytes]] = {}

    def finish(base: str) -> None:
        nonlocal imported
        files = pending.pop(base)
        where = f"{in_path}:{base}"
        try:
            manifest = _check_entry(base, files, where)
            if verify:
                verify_by_recompiling(manifest, files, where)
        except CorruptEntry as e:
            rejected.append(str(e))
            return
        name, key = manifest["name"], manifest["key"]
        if cache.lookup(name, key) is None:
            cache.publish(name, key, files)
        imported += 1

    try:
        with open(in_path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for m in tar:
                place = _member_place(m, in_path)
                if place is None:
                    continue
                base, fname = place
                files = pending.setdefault(base, {})
                if fname in files:
                    raise ImportRefused(f"{in_path}: {m.name[:120]!r} appears twice")
                files[fname] = tar.extractfile(m).read(MAX_MEMBER_BYTES + 1)
                if len(files) == len(ENTRY_FILES):
                    finish(base)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as e:
        raise ImportRefused(f"{in_path}: truncated or not a tar(.gz) archive ({e}); "
                            f"{imported} entries were imported before it") from e
    for base in sorted(pending):
        finish(base)         # incomplete: rejected with what is missing
    return imported, rejected
