"""Buffer construction arguments the serving frameworks pass (CPU: the checks run before any
process group or GPU is needed)."""
import pytest

import epgen


def test_allow_mnnvl_is_accepted_as_sglang_passes_it():
    """SGLang (python/sglang/srt/layers/moe/token_dispatcher/deepep.py,
    DeepEPBuffer.get_deepep_buffer) always passes allow_mnnvl=True; DeepEP V1 reads it as a
    permission (it only stops disabling NVSHMEM's multi-node NVLink detection), so it must not
    be an argument error: construction gets as far as needing a process group."""
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        epgen.Buffer(None, 1 << 20, 0, low_latency_mode=False, num_qps_per_rank=1,
                     allow_mnnvl=True)


def test_use_fabric_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match="use_fabric=True"):
        epgen.Buffer(None, 1 << 20, 0, use_fabric=True)
