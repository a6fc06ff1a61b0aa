"""Imports point down only (design.md): a package of epgen never imports one above it. The
layers, lowest first, as docs/internals.md lays them out: the build side (jit) and the store
(cache) need no GPU; runtime wraps the driver and NVSHMEM; regions holds the symmetric
regions' byte layouts and size hints; ops the operation families; the facade (buffer, config)
and the tools (cli, bench, precompile) on top. config.py sits below ops: its size hints read
regions, never an operation family (architecture review, 3.1)."""
from __future__ import annotations

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "epgen")

# What each layer must never import (epgen.<name>, as a package or a top-level module).
FORBIDDEN = {
    "jit": {"runtime", "regions", "ops", "buffer", "config", "bench", "cli", "precompile"},
    "cache": {"runtime", "regions", "ops", "buffer", "config", "bench", "cli", "precompile"},
    "runtime": {"regions", "ops", "buffer", "config", "bench", "cli", "precompile"},
    "regions": {"runtime", "ops", "buffer", "config", "bench", "cli", "precompile"},
    "config": {"runtime", "ops", "buffer", "bench", "cli", "precompile"},
    "ops": {"buffer", "config", "bench", "cli", "precompile"},
}


def _imports(path: str, module: str) -> set[str]:
    """The epgen.* names a module imports (relative imports resolved), top-level or lazy."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] == "epgen"}


def _modules():
    for root, _, files in os.walk(PKG):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                yield path, rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_layer_has_modules():
    layers = {_layer(m) for _, m in _modules()}
    assert set(FORBIDDEN) <= layers, set(FORBIDDEN) - layers


@pytest.mark.parametrize("path,module", [pytest.param(p, m, id=m) for p, m in _modules()])
def test_imports_point_down(path, module):
    forbidden = FORBIDDEN.get(_layer(module), set())
    upward = sorted(name for name in _imports(path, module)
                    if len(name.split(".")) > 1 and name.split(".")[1] in forbidden)
    assert not upward, f"{module} imports {upward}: above its layer ({_layer(module)})"
