"""The prelude PCH helps or is not used: NVRTC accepts a PCH only in the process that made it,
so each process makes its own, uses it for every compile, and leaves no file behind; a process
that builds too few kernels for it to pay makes none."""
import glob
import json
import os

from sandbox import epgen_argv, run


def spec_file(tmp_path, name, hiddens):
    p = tmp_path / name
    p.write_text("kernels:\n" + "".join(
        f"  - {{family: normal_combine, hidden: {h}, num_topk: 2, num_ranks: 2}}\n"
        for h in hiddens))
    return str(p)


def logs(cache, hiddens):
    out = {}
    for path in glob.glob(os.path.join(cache, "combine_*", "manifest.json")):
        m = json.load(open(path))
        if m["spec"]["hidden"] in hiddens:
            out[m["spec"]["hidden"]] = open(os.path.join(os.path.dirname(path), "build.log")).read()
    assert sorted(out) == sorted(hiddens), out.keys()
    return out


def test_every_process_uses_its_own_pch_and_leaves_no_file(tmp_path):
    cache = str(tmp_path / "cache")
    for name, hiddens in (("a.yaml", [1040, 1056]), ("b.yaml", [1072, 1088])):
        r = run(epgen_argv("--cache-dir", cache, "precompile", "--spec",
                           spec_file(tmp_path, name, hiddens), "--arch", "sm_90", "--jobs", "1"))
        assert r.returncode == 0, r.stderr
        for h, log in logs(cache, hiddens).items():
            assert "using precompiled header" in log, (h, log[:1500])
            assert "incompatible precompiled header" not in log, (h, log[:1500])
    assert os.listdir(os.path.join(cache, ".pch")) == [], "a PCH file outlived its process"


def test_a_worker_with_one_kernel_makes_no_pch(tmp_path):
    cache = str(tmp_path / "cache")
    hiddens = [1104, 1120]
    r = run(epgen_argv("--cache-dir", cache, "precompile", "--spec",
                       spec_file(tmp_path, "c.yaml", hiddens), "--arch", "sm_90", "--jobs", "2"))
    assert r.returncode == 0, r.stderr
    for h, log in logs(cache, hiddens).items():
        assert "precompiled header" not in log, (h, log[:1500])
