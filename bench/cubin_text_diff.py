"""Are two caches' kernels the same machine code? Compares the executable sections (`.text.*`)
of the cubins of two caches, matched by spec (the manifest's "spec", not the key: a refactor
that changes the key but not the code must still match) and, inside a cubin, by section name.

Use it to prove a refactor behaviour-neutral without a GPU:

    epgen precompile --cache-dir /tmp/before --spec tests/data/gpu-suites.yaml   # old tree
    epgen precompile --cache-dir /tmp/after  --spec tests/data/gpu-suites.yaml   # new tree
    python bench/cubin_text_diff.py /tmp/before /tmp/after

Symbol tables, notes and other non-executable sections may differ (say, a renamed constant); a
difference in `.text.*` is a different kernel. Exits 1 if any kernel's code differs or a spec is
in one cache only. A spec field added with NEW_FIELD metadata, at its default, matches the old
manifests without it (spec_key).
"""
from __future__ import annotations

import glob
import json
import os
import struct
import sys


def text_sections(elf: bytes) -> dict[str, bytes]:
    """name -> contents of every `.text.*` section of a 64-bit little-endian ELF (a cubin)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx]
    names = elf[strtab[4]:strtab[4] + strtab[5]]

    def name(off: int) -> str:
        return names[off:names.index(b"\0", off)].decode()

    out = {}
    for sh_name, sh_type, _flags, _addr, offset, size, *_ in headers:
        n = name(sh_name)
        if n.startswith(".text."):
            out[n] = b"" if sh_type == 8 else elf[offset:offset + size]   # 8: SHT_NOBITS
    return out


def spec_key(spec: dict) -> str:
    """A manifest's spec, canonical: its describe() where this tree's specs read it, so a field
    added since with NEW_FIELD metadata, at its default, matches the manifests written before
    it existed (such a field leaves the kernel's code alone); else the spec's sorted JSON."""
    try:
        from epgen.jit.specs import spec_from_json
        return spec_from_json(spec).describe()
    except (ImportError, TypeError, ValueError):     # not this tree's spec: compare as written
        return json.dumps(spec, sort_keys=True)


def cubins(root: str) -> dict[str, tuple[str, str]]:
    """canonical spec (spec_key) -> (entry name, cubin path) for every entry of a cache."""
    out = {}
    for manifest in glob.glob(os.path.join(root, "*", "manifest.json")):
        with open(manifest) as f:
            m = json.load(f)
        out[spec_key(m["spec"])] = (
            m["name"], os.path.join(os.path.dirname(manifest), "kernel.cubin"))
    return out


def compare(before_root: str, after_root: str) -> tuple[list[str], dict]:
    before, after = cubins(before_root), cubins(after_root)
    lines, counts = [], {"identical": 0, "text_differs": 0, "other_bytes_differ": 0,
                         "only_before": 0, "only_after": 0}
    for spec in sorted(before.keys() | after.keys()):
        if spec not in after or spec not in before:
            side = "before" if spec not in after else "after"
            counts[f"only_{side}"] += 1
            lines.append(f"only in {side}: {(before.get(spec) or after.get(spec))[0]}")
            continue
        (name, a_path), (_, b_path) = before[spec], after[spec]
        with open(a_path, "rb") as f:
            a_bytes = f.read()
        with open(b_path, "rb") as f:
            b_bytes = f.read()
        a, b = text_sections(a_bytes), text_sections(b_bytes)
        if a == b:
            counts["identical"] += 1
            if a_bytes != b_bytes:
                counts["other_bytes_differ"] += 1
            continue
        counts["text_differs"] += 1
        changed = sorted(s for s in a.keys() | b.keys() if a.get(s) != b.get(s))
        lines.append(f"TEXT DIFFERS: {name} {spec}: {', '.join(changed)}")
    return lines, counts


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    lines, counts = compare(*argv)
    for line in lines:
        print(line)
    total = sum(v for k, v in counts.items() if k != "other_bytes_differ")
    print(f"cubin_text_diff: {total} specs: {counts['identical']} identical .text "
          f"({counts['other_bytes_differ']} of them differ outside .text), "
          f"{counts['text_differs']} differ in .text, {counts['only_before']} only before, "
          f"{counts['only_after']} only after")
    return 0 if total == counts["identical"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
