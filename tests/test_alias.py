"""`epgen alias install | remove` in a fresh virtual environment: an unmodified program's
`import deep_ep` (as vLLM, SGLang and Megatron write it) gets epgen; a real DeepEP is never
shadowed or deleted; `epgen doctor` says which deep_ep is in use."""
import os
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The frameworks' imports and the CPU-runnable calls they make before any rank exists.
FRAMEWORK_IMPORTS = r'''
import importlib.util
import torch
# vLLM vllm/utils/import_utils.py has_deep_ep(): a find_spec probe, then `import deep_ep`
assert importlib.util.find_spec("deep_ep") is not None
import deep_ep
import epgen
assert deep_ep.Buffer is epgen.Buffer, deep_ep.Buffer
# SGLang python/sglang/srt/layers/moe/token_dispatcher/deepep.py
from deep_ep import Buffer, Config
# Megatron megatron/core/transformer/moe/fused_a2a.py
from deep_ep.utils import EventHandle, EventOverlap
from deep_ep.buffer import Buffer as Buffer2
assert Buffer2 is Buffer and deep_ep.EventOverlap is EventOverlap
assert deep_ep.topk_idx_t is torch.int64
# vLLM DeepEPLLAll2AllManager._make_all2all_kwargs: keyword arguments
n = deep_ep.Buffer.get_low_latency_rdma_size_hint(
    num_max_dispatch_tokens_per_rank=128, hidden=7168, num_ranks=8, num_experts=256)
assert n > 0
# SGLang DeepEPBuffer.get_deepep_buffer / Megatron get_buffer: Config size hints
nvl = max(c.get_nvl_buffer_size_hint(7168 * 2, 8)
          for c in (Buffer.get_dispatch_config(8), Buffer.get_combine_config(8)))
assert nvl > 0 and Buffer.get_dispatch_config(8).get_rdma_buffer_size_hint(7168 * 2, 8) >= 0
# SGLang DeepEPConfig: Config(**json) ; vLLM / Megatron: Buffer.set_num_sms
cfg = Config(**{"num_sms": 24, "num_max_nvl_chunked_send_tokens": 16,
                "num_max_nvl_chunked_recv_tokens": 256, "num_max_rdma_chunked_send_tokens": 6,
                "num_max_rdma_chunked_recv_tokens": 128})
assert cfg.num_sms == 24 and Buffer.num_sms == 20
deep_ep.Buffer.set_num_sms(24)
assert Buffer.num_sms == 24
# Megatron probes for DeepEP's hybrid buffer with try/except ImportError
try:
    from deep_ep import HybridEPBuffer  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("HybridEPBuffer should not import")
print("FRAMEWORK_IMPORTS_OK")
'''


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh virtual environment whose interpreter finds torch and epgen through PYTHONPATH
    (not installed into it); its own site-packages is where the alias goes."""
    d = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(d)], check=True)
    py = str(d / "bin" / "python")
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, sysconfig.get_paths()["purelib"]]))
    return py, purelib, env


def run(venv, *args, extra_path=None, check=True):
    py, _, env = venv
    if extra_path:
        env = dict(env, PYTHONPATH=os.pathsep.join([extra_path, env["PYTHONPATH"]]))
    r = subprocess.run([py, *args], capture_output=True, text=True, env=env, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"{args}: rc {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def test_alias_install_imports_remove(venv):
    py, purelib, _ = venv
    real = run(venv, "-c", "from epgen import alias; print(alias.real_deepep())").stdout.strip()
    if real != "[]":       # a machine with DeepEP itself installed (the alias must refuse)
        pytest.skip(f"a real DeepEP is visible here: {real}")
    assert run(venv, "-c", "import deep_ep", check=False).returncode != 0
    out = run(venv, "-m", "epgen", "alias", "install").stdout
    pkg = os.path.join(purelib, "deep_ep")
    assert pkg in out and os.path.isfile(os.path.join(pkg, "EPGEN_ALIAS.json"))
    assert "FRAMEWORK_IMPORTS_OK" in run(venv, "-c", FRAMEWORK_IMPORTS).stdout
    doctor = run(venv, "-m", "epgen", "doctor", check=False).stdout
    assert f"deep_ep: epgen alias at {os.path.realpath(pkg)}" in doctor, doctor
    # installing again refreshes it in place
    run(venv, "-m", "epgen", "alias", "install")
    out = run(venv, "-m", "epgen", "alias", "remove").stdout
    assert f"removed {pkg}" in out and not os.path.exists(pkg)
    r = run(venv, "-c", "import deep_ep", check=False)
    assert r.returncode != 0 and "No module named 'deep_ep'" in r.stderr, r.stderr
    assert "no alias" in run(venv, "-m", "epgen", "alias", "remove").stdout
    assert "deep_ep: none" in run(venv, "-m", "epgen", "doctor", check=False).stdout


def _fake_real_deepep(root, name="deep_ep"):
    """A FAKE DeepEP: a package named deep_ep without epgen's marker, in its own site dir."""
    pkg = os.path.join(root, name)
    os.makedirs(pkg)
    with open(os.path.join(pkg, "__init__.py"), "w") as f:
        f.write("FAKE_REAL_DEEPEP = True\n")
    return pkg


def test_alias_refuses_while_a_real_deepep_is_installed(venv, tmp_path):
    py, purelib, _ = venv
    site = str(tmp_path / "othersite")
    fake = _fake_real_deepep(site)
    r = run(venv, "-m", "epgen", "alias", "install", extra_path=site, check=False)
    assert r.returncode == 1 and "a real DeepEP is installed" in r.stderr and fake in r.stderr, \
        r.stderr
    assert not os.path.exists(os.path.join(purelib, "deep_ep"))
    doctor = run(venv, "-m", "epgen", "doctor", extra_path=site, check=False).stdout
    assert f"deep_ep: DeepEP at {os.path.realpath(fake)} (not epgen)" in doctor, doctor


def test_alias_never_deletes_a_deep_ep_it_did_not_write(venv):
    py, purelib, _ = venv
    if os.path.exists(os.path.join(purelib, "deep_ep")):
        pytest.skip("the venv's site-packages already holds a deep_ep")
    fake = _fake_real_deepep(purelib)
    try:
        r = run(venv, "-m", "epgen", "alias", "remove", check=False)
        assert r.returncode == 1 and "not written by `epgen alias install`" in r.stderr, r.stderr
        assert os.path.isfile(os.path.join(fake, "__init__.py"))
        r = run(venv, "-m", "epgen", "alias", "install", check=False)
        assert r.returncode == 1 and "real DeepEP" in r.stderr
        assert open(os.path.join(fake, "__init__.py")).read() == "FAKE_REAL_DEEPEP = True\n"
    finally:
        import shutil
        shutil.rmtree(fake)
