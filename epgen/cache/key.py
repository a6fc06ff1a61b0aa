"""The cache key: everything that changes the binary, nothing else (no absolute paths)."""
from __future__ import annotations

import hashlib
import json
import os


def _headers_digest(templates_dir: str, files: list[str]) -> str:
    h = hashlib.sha256()
    for name in files:
        h.update(name.encode() + b"\0")
        with open(os.path.join(templates_dir, name), "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()


def key_parts(source: str, recipe, toolchain_signature: dict,
              templates_dir: str, header_files: list[str]) -> dict:
    """recipe: the compiler.Recipe of the build (every NVRTC and nvJitLink option), whole."""
    return {
        "source_sha256": hashlib.sha256(source.encode()).hexdigest(),
        "headers_sha256": _headers_digest(templates_dir, header_files),
        "arch": recipe.arch,
        "recipe": recipe.to_json(),
        **toolchain_signature,
    }


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
