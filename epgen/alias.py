"""`epgen alias install | remove`: let an unmodified program's `import deep_ep` get epgen.

The alias is a small `deep_ep` package written into the active environment's site-packages
(sysconfig's purelib) whose modules re-export epgen's surface under DeepEP V1's module names:
`deep_ep` (Buffer, Config, EventOverlap, topk_idx_t), `deep_ep.buffer` (Buffer) and
`deep_ep.utils` (EventHandle, EventOverlap), which is what vLLM, SGLang and Megatron import.
A marker file lists the files the alias wrote; `remove` deletes only a package carrying it, and
`install` refuses while a real DeepEP (a `deep_ep` without the marker, its `deep_ep_cpp`
extension, or its distribution metadata) is visible, so the alias never shadows or deletes one.
"""
from __future__ import annotations

import importlib.machinery
import importlib.metadata
import json
import os
import shutil
import sys
import sysconfig

PACKAGE = "deep_ep"
MARKER = "EPGEN_ALIAS.json"
_HEADER = ("# Written by `epgen alias install`: DeepEP V1's module names mapped to epgen.\n"
           "# Remove with `epgen alias remove`.\n")
# Module file -> its body. Eager imports, as DeepEP's own package imports torch and its
# extension at `import deep_ep`: a program's try/except ImportError probe sees the truth.
FILES = {
    "__init__.py": (
        "from epgen.buffer import Buffer\n"
        "from epgen.config import Config\n"
        "from epgen.runtime.events import EventOverlap\n"
        "import torch as _torch\n"
        "from . import buffer, utils  # noqa: E402  (deep_ep.buffer, deep_ep.utils)\n\n"
        "topk_idx_t = _torch.int64\n"
        "__all__ = [\"Buffer\", \"Config\", \"EventOverlap\", \"topk_idx_t\"]\n"),
    "buffer.py": (
        "from epgen.buffer import Buffer  # noqa: F401\n"
        "from epgen.config import Config  # noqa: F401\n"
        "from epgen.runtime.events import EventHandle, EventOverlap  # noqa: F401\n"),
    "utils.py": (
        "from epgen.runtime.events import EventHandle, EventOverlap  # noqa: F401\n"),
}


class AliasError(RuntimeError):
    pass


def site_dir() -> str:
    """The active environment's site-packages, where pip would install a package."""
    return sysconfig.get_paths()["purelib"]


def _marker(pkg_dir: str) -> dict | None:
    try:
        with open(os.path.join(pkg_dir, MARKER), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("written_by") == "epgen alias" else None


def _search_path() -> list[str]:
    entries = [p or os.getcwd() for p in sys.path]
    site = site_dir()
    return entries + ([site] if site not in entries else [])


def find_deep_ep() -> list[tuple[str, str, str]]:
    """Every `deep_ep` package and DeepEP `deep_ep_cpp` extension on the import path, in import
    order, as (module, kind, path): kind 'alias' (written by epgen) or 'deepep'. Imports nothing;
    directories without an __init__ (namespace portions) are not packages anyone installed."""
    found, seen = [], set()
    for entry in _search_path():
        for name in (PACKAGE, "deep_ep_cpp"):
            spec = importlib.machinery.PathFinder.find_spec(name, [entry])
            if spec is None or spec.origin is None or spec.loader is None:
                continue
            locations = list(spec.submodule_search_locations or [])
            path = os.path.realpath(locations[0] if locations else spec.origin)
            if path in seen:
                continue
            seen.add(path)
            alias = name == PACKAGE and _marker(path) is not None
            found.append((name, "alias" if alias else "deepep", path))
    return found


def _deepep_distributions() -> list[str]:
    names = []
    for dist in importlib.metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("-", "_")
        if name == PACKAGE:
            names.append(f"distribution {dist.metadata['Name']} {dist.version} in "
                         f"{dist.locate_file('')}")
    return names


def real_deepep() -> list[str]:
    """Descriptions of every real DeepEP install visible to this interpreter."""
    return [path for _, kind, path in find_deep_ep() if kind == "deepep"] + \
        _deepep_distributions()


def install(target: str | None = None) -> str:
    """Write the alias package into `target` (default: site_dir()); returns its path."""
    real = real_deepep()
    if real:
        raise AliasError("a real DeepEP is installed (" + "; ".join(real) + "): the alias would "
                         "shadow it. Uninstall DeepEP first, or use it instead of the alias")
    target = target or site_dir()
    pkg = os.path.join(target, PACKAGE)
    if os.path.exists(pkg) and _marker(pkg) is None:     # e.g. a deep_ep off sys.path here
        raise AliasError(f"{pkg} exists and was not written by epgen; leaving it alone")
    try:
        os.makedirs(pkg, exist_ok=True)
        for name, body in FILES.items():
            with open(os.path.join(pkg, name), "w", encoding="utf-8") as f:
                f.write(_HEADER + body)
        from . import __version__
        with open(os.path.join(pkg, MARKER), "w", encoding="utf-8") as f:
            json.dump({"written_by": "epgen alias", "epgen_version": __version__,
                       "files": sorted(FILES) + [MARKER]}, f, indent=1)
    except OSError as e:
        raise AliasError(f"cannot write the alias into {target}: {e}") from e
    return pkg


def remove(target: str | None = None) -> str | None:
    """Delete the alias package from `target` (default: site_dir()): only the files its marker
    lists (and their bytecode). Returns the removed path, None if there was no alias."""
    target = target or site_dir()
    pkg = os.path.join(target, PACKAGE)
    if not os.path.exists(pkg):
        return None
    marker = _marker(pkg)
    if marker is None:
        raise AliasError(f"{pkg} was not written by `epgen alias install` (no {MARKER}); "
                         "not removing it")
    for name in marker.get("files", []):
        if os.path.basename(name) == name:                 # never a path outside the package
            try:
                os.remove(os.path.join(pkg, name))
            except FileNotFoundError:
                pass
    shutil.rmtree(os.path.join(pkg, "__pycache__"), ignore_errors=True)
    try:
        os.rmdir(pkg)
    except OSError:
        raise AliasError(f"removed the alias's files, but {pkg} holds other files; left them")
    return pkg


def describe() -> str:
    """Which `deep_ep` an `import deep_ep` here would get (for `epgen doctor`)."""
    found = [(k, p) for name, k, p in find_deep_ep() if name == PACKAGE]
    if not found:
        return ("none: `import deep_ep` fails (`epgen alias install` maps it to epgen; "
                "`import epgen as deep_ep` needs no alias)")
    kind, path = found[0]
    text = (f"epgen alias at {path} (-> epgen at {os.path.dirname(os.path.abspath(__file__))})"
            if kind == "alias" else f"DeepEP at {path} (not epgen)")
    shadowed = [p for _, p in found[1:]]
    return text + (f"; shadows {', '.join(shadowed)}" if shadowed else "")
