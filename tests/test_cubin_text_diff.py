"""bench/cubin_text_diff.py on two hand-made caches (tiny ELF files standing in for cubins): a
spec field added with NEW_FIELD metadata, at its default, still matches the manifests written
before it existed, and a change in a `.text.*` section is reported. CPU only."""
import importlib.util
import json
import os
import struct

from epgen.jit.specs import LowLatencyDispatchSpec

HERE = os.path.dirname(__file__)
_spec = importlib.util.spec_from_file_location(
    "cubin_text_diff", os.path.join(HERE, "..", "bench", "cubin_text_diff.py"))
ctd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ctd)


def _elf(text: bytes) -> bytes:
    """A 64-bit little-endian ELF with sections: null, .shstrtab, .text.k (contents `text`)."""
    names = b"\0.shstrtab\0.text.k\0"
    data_off = 64
    text_off = data_off + len(names)
    sh_off = text_off + len(text)
    head = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    head += struct.pack("<HHIQQQIHHHHHH", 1, 190, 1, 0, 0, sh_off, 0, 64, 0, 0, 64, 3, 1)
    shdr = lambda name, typ, off, size: struct.pack("<IIQQQQIIQQ", name, typ, 0, 0, off, size,  # noqa: E731
                                                    0, 0, 1, 0)
    return (head + names + text + shdr(0, 0, 0, 0) + shdr(1, 3, data_off, len(names))
            + shdr(11, 1, text_off, len(text)))


def _cache(root, spec_json, text):
    d = os.path.join(root, "entry")
    os.makedirs(d)
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump({"spec": spec_json, "name": "k"}, f)
    with open(os.path.join(d, "kernel.cubin"), "wb") as f:
        f.write(_elf(text))


def test_a_new_field_at_its_default_matches_the_old_manifests(tmp_path):
    new = LowLatencyDispatchSpec(hidden=2880, num_topk=8, num_experts=32, num_ranks=2).to_json()
    old = {k: v for k, v in new.items() if k != "recv_scale_layout"}   # written before the field
    assert ctd.text_sections(_elf(b"abcd")) == {".text.k": b"abcd"}
    _cache(str(tmp_path / "before"), old, b"\x01\x02")
    _cache(str(tmp_path / "same"), new, b"\x01\x02")
    _cache(str(tmp_path / "changed"), new, b"\x01\x03")
    assert ctd.main([str(tmp_path / "before"), str(tmp_path / "same")]) == 0
    lines, counts = ctd.compare(str(tmp_path / "before"), str(tmp_path / "changed"))
    assert counts["text_differs"] == 1 and lines[0].startswith("TEXT DIFFERS: k")
