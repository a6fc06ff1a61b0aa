"""The install and the docs say what is true: one CUDA's wheels per extra, the README's set-up
commands are the ones CI runs, the docs name only files in the repository, and no option is
documented or accepted that does nothing."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "docs/internals.md", "bench/NOTES.md"]


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def test_each_extra_pulls_one_cuda_and_no_torch():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads(read("pyproject.toml"))["project"]
    names = lambda reqs: [re.split(r"[<>=\[ ;]", r, maxsplit=1)[0].lower() for r in reqs]  # noqa
    assert "torch" not in names(project["dependencies"]), "torch must come from the user's index"
    extras = project["optional-dependencies"]
    # test tools only: no toolchain (a [cu12,test] install must pull no CUDA 13 wheel), no torch;
    # it may pull other extras that hold neither (bench: matplotlib)
    cuda_like = lambda n: n == "torch" or n.startswith(("nvidia-", "cuda-"))  # noqa: E731
    assert not [n for n in names(extras["test"]) if cuda_like(n)], extras["test"]
    for req in extras["test"]:
        if req.startswith("epgen["):
            for extra in req[len("epgen["):req.index("]")].split(","):
                assert extra not in ("cu12", "cu13"), req
                assert not [n for n in names(extras[extra]) if cuda_like(n)], (extra, extras[extra])
    cu12, cu13 = names(extras["cu12"]), names(extras["cu13"])
    assert all(n.endswith("-cu12") or n == "cuda-bindings" for n in cu12), cu12
    assert "cuda-bindings>=12.8,<13" in extras["cu12"]
    assert not set(cu12) & set(cu13) - {"cuda-bindings"}
    assert "cuda-bindings>=13.0,<14" in extras["cu13"]


def commands(block: str) -> list[str]:
    """Each command of a shell text: lines without comments, split at &&."""
    lines = [re.sub(r"(^|\s)#.*$", "", line) for line in block.splitlines()]
    return [c.strip() for line in lines for c in line.split("&&") if c.strip()]


def normalise(cmd: str) -> str:
    return re.sub(r"\s+", " ", cmd.replace("python -m pip", "pip").replace(" -q", "")).strip()


def test_every_package_of_the_source_tree_is_installed():
    """A non-editable install ships only the packages pyproject.toml lists: one left out
    (epgen.regions was) installs an epgen whose import fails, though an editable install and
    every test from the checkout still pass."""
    tomllib = pytest.importorskip("tomllib")
    listed = tomllib.loads(read("pyproject.toml"))["tool"]["setuptools"]["packages"]
    tree = sorted(os.path.relpath(os.path.dirname(p), ROOT).replace(os.sep, ".")
                  for p in glob.glob(os.path.join(ROOT, "epgen", "**", "__init__.py"),
                                     recursive=True))
    assert sorted(listed) == tree, f"pyproject.toml packages {sorted(listed)} != {tree}"


def test_readme_set_up_commands_are_what_ci_runs():
    blocks = re.findall(r"```bash\n(.*?)```", read("README.md"), re.S)
    setup, tests = commands(blocks[0]), commands(blocks[1])
    ci = [normalise(c) for c in commands(read(".ci/run"))]
    for cmd in setup:
        if cmd.startswith(("pip ", "python3 -m venv")):
            assert normalise(cmd) in ci, (cmd, ci)
    assert any(c.startswith("epgen precompile --spec examples/deepseek-v3.yaml") for c in setup)
    assert any("epgen precompile --spec examples/deepseek-v3.yaml" in c for c in ci)
    assert "python -m pytest -q" in tests and ci[-1] == normalise("python -m pytest -q")
    cu12 = [c for b in blocks for c in commands(b) if "cu12" in c and c.startswith("pip ")]
    assert cu12 and all(normalise(c) in [normalise(x) for x in commands(read(".ci/cu12-compile"))]
                        for c in cu12), cu12


def test_docs_name_only_files_in_the_repository():
    for doc in DOCS:
        text = read(doc)
        assert "../shared" not in text and "/work/" not in text, doc
        for link in re.findall(r"\]\(([^)#]+)\)", text):
            if not link.startswith("http"):
                assert os.path.exists(os.path.join(ROOT, os.path.dirname(doc), link)), (doc, link)
        for path in re.findall(r"`((?:epgen|tests|bench|docs|examples|\.ci)/[\w./-]+)`", text):
            assert glob.glob(os.path.join(ROOT, path)), (doc, path)


def test_no_option_that_does_nothing():
    files = glob.glob(os.path.join(ROOT, "epgen", "**", "*.py"), recursive=True) + [
        p for p in glob.glob(os.path.join(ROOT, "tests", "*.py")) if not p.endswith(__file__)]
    sources = "".join(read(os.path.relpath(p, ROOT)) for p in files)
    readme = read("README.md")
    for var in sorted(set(re.findall(r"`(EPGEN_[A-Z_]+)", readme))):
        assert f'"{var}"' in sources, f"{var} is documented but never read"
    assert "EPGEN_LOG" not in sources + readme
    assert "num_max_dispatch_tokens_per_rank" not in read("examples/deepseek-v3.yaml")
