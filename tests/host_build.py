"""Host builds of device headers (tests/host/*.cpp include a .cuh and run it with a warp as 32
threads): one compile per test module, skipped where the machine has no C++ compiler."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

HOST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "host")


def build(tmp_path_factory, source: str, what: str, *flags: str) -> str:
    """tests/host/<source> compiled with g++ (or c++) and `flags` into a fresh folder; the
    executable's path. Skips the caller when there is no compiler (`what` says for what)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip(f"no C++ compiler for the host build of {what}")
    exe = str(tmp_path_factory.mktemp(os.path.splitext(source)[0]) / "host_program")
    subprocess.run([cxx, *flags, "-o", exe, os.path.join(HOST_DIR, source)], check=True)
    return exe
