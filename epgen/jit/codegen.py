"""Spec -> rendered CUDA translation unit (jinja2). Templates do the work; this only wires them.

The rendered unit is small: it includes the shipped `.cuh` headers, declares the kernel
argument struct (rendered from the ctypes definition in kernel_args, so host and device
layouts cannot drift) and instantiates the family's device template with the spec's values.
Rendering is deterministic: the same spec gives the same bytes.
"""
from __future__ import annotations

import functools
import os
import re

import jinja2

from . import kernel_args, layout_facts
from .specs import NAMESPACE, KernelSpec

TEMPLATES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def cpp_bool(value: bool) -> str:
    return "true" if value else "false"


def render(spec: KernelSpec) -> str:
    template = environment().get_template(spec.template)
    args_classes = spec.args_structs()            # a TU may define several kernels
    S = spec.struct_name
    entries = [dict(name=spec.kernel_name(e.kind), args=c.__name__, device=e.device,
                    threads=e.threads, min_blocks=e.min_blocks)
               for e, c in zip(spec.entries, args_classes)]
    return template.render(
        spec=spec,
        ns=NAMESPACE,
        S=S,
        constants=spec.constants(),
        checks=[(expr.replace("{S}", S), value, why) for expr, value, why in spec.device_checks()],
        entries=entries,
        args_struct="".join(kernel_args.c_struct(c) for c in args_classes),
        cpp_bool=cpp_bool,
        facts=layout_facts.render_values(),
        fact_checks=layout_facts.render_checks(unit_headers(spec)),
    )


def unit_headers(spec: KernelSpec) -> frozenset[str]:
    """The package headers a spec's unit includes, directly or through other headers."""
    out = set()
    for h in ("prelude.cuh", *spec.headers):
        out |= {h} | included_headers(h)
    return frozenset(out)


@functools.lru_cache(maxsize=64)
def included_headers(name: str) -> frozenset[str]:
    """The package headers a template includes, directly or through other headers."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        with open(os.path.join(TEMPLATES_DIR, todo.pop()), encoding="utf-8") as f:
            for inc in re.findall(r'^\s*#include "([^"]+)"', f.read(), re.M):
                if inc not in seen and os.path.exists(os.path.join(TEMPLATES_DIR, inc)):
                    seen.add(inc)
                    todo.append(inc)
    return frozenset(seen)


def source_filename(spec: KernelSpec) -> str:
    return f"{spec.name}.cu"


def header_files() -> list[str]:
    """Every file a rendered unit can include from the package (hashed into the cache key)."""
    return sorted(f for f in os.listdir(TEMPLATES_DIR) if f.endswith((".cuh", ".j2")))
