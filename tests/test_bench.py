"""`epgen bench` on CPU: the table and the plot of recorded runs (bench/results/), sweeps and
shared-GPU labels, the progress bar, and the command line's parsing and validation."""
import argparse
import copy
import io
import json
import os

import pytest

from epgen import cli
from epgen.bench import cli as bench_cli
from epgen.bench import report
from epgen.bench.progress import Progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LL = os.path.join(ROOT, "bench", "results", "low_latency_ep2_h200_336241c.json")
NORMAL = os.path.join(ROOT, "bench", "results", "normal_ep2_h200_336241c.json")


def _png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    return head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 10_000


def test_table_of_a_recorded_low_latency_run():
    text = report.table(report.load(LL))
    lines = {ln.split()[0] + " " + ln.split()[1]: ln for ln in text.splitlines()[3:] if ln.strip()}
    assert text.splitlines()[0].startswith("H200, EP2, hidden 7168, top-8 of 288 experts")
    # 21.92 us against NCCL's 33.408 us on the same FP8 bytes; 342.69 of the copy's 391.15 GB/s
    assert lines["ll_dispatch fp8"].split()[-2:] == ["0.66", "0.88"], lines["ll_dispatch fp8"]
    assert lines["ll_combine bf16"].split()[-2:] == ["0.83", "0.94"]
    # a hooked half or a back-to-back pair is not compared with a whole all-to-all
    assert lines["ll_dispatch_send fp8"].split()[-2:] == ["-", "-"]
    assert lines["ll_dispatch_combine fp8"].split()[-2:] == ["-", "-"]
    assert "copy bound (1 GiB GPU to GPU): 391.1 GB/s" in text
    assert "not NVLink" not in text


def test_a_file_of_every_rank_loads_rank_0():
    recs = report.load(NORMAL)
    assert [r["op"] for r in recs] == ["normal_dispatch"] * 3 + ["normal_combine", "nccl_a2a", "copy"]
    assert "normal_dispatch bf16 24 SMs" in report.table(recs)


def test_load_rejects_a_file_that_is_not_records(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"cold": []}))
    with pytest.raises(ValueError, match=f"{bad}: not a bench record file"):
        report.load(str(bad))
    bad.write_text(json.dumps({"records": [{"op": "ll_dispatch", "dtype": "fp8"}]}))
    with pytest.raises(ValueError, match="lacks \\['time_us', 'gbps'\\]"):
        report.load(str(bad))


def test_plot_of_one_run_and_of_a_sweep(tmp_path):
    pytest.importorskip("matplotlib")      # the bench extra (CI installs it with test)
    recs = report.load(LL)
    assert _png(report.plot(recs, str(tmp_path / "one.png")))
    sweep = []
    for t in (16, 32, 64, 128):        # the recorded run, rescaled as a sweep would record it
        for r in recs:
            r = dict(r, tokens=t if r["op"] != "copy" else 0)
            if r["op"] != "copy":
                r["time_us"] *= t / 128
            sweep.append(r)
    assert _png(report.plot(sweep, str(tmp_path / "sweep.png")))


def test_shared_gpu_runs_are_labelled(tmp_path):
    pytest.importorskip("matplotlib")
    recs = [dict(r, shared_gpu=True, ranks_per_gpu=2) for r in report.load(LL)
            if r["op"] not in ("nccl_a2a", "copy")]
    text = report.table(recs)
    assert "(2 ranks per GPU)" in text.splitlines()[0]
    assert "ranks share a GPU: kernel-overhead floor, not NVLink figures" in text
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    seen = []
    orig = plt.Figure.savefig

    def spy(fig, *a, **k):        # what the saved figure says, besides the pixels
        seen.extend(t.get_text() for t in fig.texts)
        return orig(fig, *a, **k)
    plt.Figure.savefig = spy
    try:
        assert _png(report.plot(recs, str(tmp_path / "shared.png")))
    finally:
        plt.Figure.savefig = orig
    assert "SHARED GPU" in seen and any("not NVLink figures" in t for t in seen), seen


def test_replot_through_the_epgen_command(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main(["bench", "--replot", LL, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ll_combine bf16" in out and _png(str(tmp_path / "low_latency_ep2_h200_336241c.png"))
    assert cli.main(["bench", "--replot", str(tmp_path / "missing.json")]) == 2


def test_merge_keeps_every_rank_median():
    per_rank = [{"device": "NVIDIA H200", "records": [
        {"op": "ll_dispatch", "dtype": "fp8", "tokens": 8, "time_us": 10.0 + r, "gbps": 1.0}]}
        for r in range(2)]
    (rec,) = report.merge(per_rank, {"num_ranks": 2, "shared_gpu": False})
    assert rec["time_us"] == 10.0 and rec["per_rank_median_us"] == [10.0, 11.0]
    assert rec["device"] == "NVIDIA H200" and rec["num_ranks"] == 2


def test_progress_bar():
    s = io.StringIO()
    p = Progress(3, stream=s, width=6)
    for label in ("a", "b", "c"):
        p.step(label)
    lines = s.getvalue().splitlines()
    assert lines[0].startswith("[##....] 1/3") and lines[0].endswith(" a")
    assert lines[2].startswith("[######] 3/3")
    with pytest.raises(ValueError, match="total=0"):
        Progress(0)


def _args(*argv):
    p = argparse.ArgumentParser()
    bench_cli.add_arguments(p)
    return p.parse_args(list(argv))


def test_configs_from_arguments():
    plans = dict(bench_cli.configs(_args("--ranks", "4", "--sweep-tokens", "128,32,32")))
    assert plans["normal"]["tokens"] == [32, 128] and plans["normal"]["experts"] == 256
    assert plans["low_latency"]["experts"] == 288 and plans["low_latency"]["hidden"] == 7168
    (mode, cfg), = bench_cli.configs(_args("--mode", "low_latency", "--tokens", "64",
                                           "--experts", "64", "--topk", "6", "--hidden", "2880"))
    assert mode == "low_latency" and cfg == dict(tokens=[64], hidden=2880, topk=6, experts=64,
                                                 runs=50, warmup=5, wire_format="fp8_e4m3_f32_128",
                                                 combine_format="bf16")
    (_, cfg), = bench_cli.configs(_args("--mode", "normal", "--wire-format", "nvfp4"))
    assert cfg["wire_format"] == "nvfp4" and "combine_format" not in cfg
    (_, cfg), = bench_cli.configs(_args("--mode", "low_latency", "--combine-format", "logfmt10"))
    assert cfg["combine_format"] == "logfmt10"


def test_record_formats_name_the_format_and_its_bytes_per_token():
    import torch
    from epgen import reference as ref
    from epgen.bench import low_latency as bll
    H = 2880
    got = bll.record_formats("fp8_e4m3_f32_128", "bf16", H)
    assert got["ll_dispatch"] == got["ll_dispatch_send"] == got["ll_dispatch_recv"] == \
        ("fp8_e4m3_f32_128", H + 4 * 23)
    assert got["ll_combine"] == got["ll_combine_send"] == ("bf16", 2 * H)
    assert got["ll_dispatch_combine"] == ("fp8_e4m3_f32_128", 3 * H + 4 * 23)   # as before
    got = bll.record_formats("nvfp4", "fp8_e4m3_f32_128", H)
    assert got["ll_dispatch"] == ("nvfp4", H // 2 + 4 * (45 + 1))
    assert got["ll_combine_recv"] == ("fp8_e4m3_f32_128", H + 4 * 23)
    assert got["ll_dispatch_combine"] == ("nvfp4+fp8_e4m3_f32_128", H // 2 + 184 + H + 92)
    assert bll.record_formats("mxfp8", "logfmt10", H)["ll_combine"] == \
        ("logfmt10", 4 * 23 + 2 * H)                       # no rows: the largest message
    rows = (torch.randn(8, H, generator=torch.Generator().manual_seed(0)) * 0.1).to(torch.bfloat16)
    dtype, nb = bll.record_formats("mxfp8", "logfmt10", H, rows)["ll_combine"]
    n = ref.combine_wire_encode(rows, "logfmt10")[1]
    assert dtype == "logfmt10" and nb == float(n.double().mean()) and nb < 2 * H


@pytest.mark.parametrize("argv, needle", [
    (["--ranks", "1"], "--ranks=1: must be an int >= 2"),
    (["--ranks", "8", "--experts", "100"], "--experts=100: must be a positive multiple of --ranks=8"),
    (["--topk", "40"], "--topk=40: must be in [1, min(32"),
    (["--hidden", "7170"], "--hidden=7170: must be a positive multiple of 16"),
    (["--mode", "low_latency", "--tokens", "2000"], "--tokens=2000: must be in [1, 1024] for low_latency"),
    (["--tokens", "5", "--sweep-tokens", "1,2"], "give one of them"),
    (["--sweep-tokens", "1,x"], "--sweep-tokens='1,x': must be comma-separated ints"),
    (["--runs", "0"], "--runs=0: must be >= 1"),
    (["--wire-format", "fp4"], "--wire-format='fp4': must be a WireFormat, one of"),
    (["--wire-format", "opaque64"], "--wire-format='opaque64': the benchmark sends BF16 tokens"),
    (["--combine-format", "fp8"], "--combine-format='fp8': must be one of"),
    (["--wire-format", "mxfp8", "--hidden", "2896"],
     "--hidden=2896: mxfp8 needs a positive multiple of 32 channels"),
])
def test_bad_arguments_are_refused_before_anything_starts(argv, needle, capsys):
    with pytest.raises(ValueError, match=None) as e:
        bench_cli.configs(_args(*argv))
    assert needle in str(e.value), str(e.value)
    assert cli.main(["bench", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_valid_arguments_without_a_gpu_say_so(capsys):
    from epgen import launch
    if launch.gpu_count():
        pytest.skip("a GPU is present")
    assert cli.main(["bench", "--mode", "low_latency", "--tokens", "8"]) == 2
    assert "no CUDA GPU present" in capsys.readouterr().err


def test_records_round_trip_through_json(tmp_path):
    recs = report.load(LL)
    p = tmp_path / "r.json"
    report.write_json(copy.deepcopy(recs), str(p))
    assert report.load(str(p)) == recs
