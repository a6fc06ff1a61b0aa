"""epgen: generated MoE expert-parallel dispatch/combine, a drop-in for DeepEP V1's Buffer.

`import epgen as deep_ep` works: Buffer, Config, EventOverlap and topk_idx_t are the surface.
Imported lazily so that the CLI (precompile, cache) starts without loading CUDA or torch.
"""
__version__ = "0.1.0"
__all__ = ["Buffer", "Config", "EventOverlap", "topk_idx_t"]


def __getattr__(name):
    if name == "Buffer":
        try:
            from .buffer import Buffer
        except ModuleNotFoundError as e:
            if e.name != "torch":
                raise
            raise ModuleNotFoundError(
                "epgen.Buffer needs PyTorch, which epgen does not install: install the torch "
                "build for your CUDA first (README, Set up)", name="torch") from e
        return Buffer
    if name == "Config":
        from .config import Config
        return Config
    if name == "EventOverlap":
        from .runtime.events import EventOverlap
        return EventOverlap
    if name == "topk_idx_t":
        import torch
        return torch.int64
    raise AttributeError(f"module 'epgen' has no attribute {name!r}")
