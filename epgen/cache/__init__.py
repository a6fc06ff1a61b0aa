"""Content-addressed on-disk cache of compiled kernels (key: cache/key.py; layout: cache/store.py)."""
from .key import cache_key, key_parts
from .store import Cache, CacheEntry, CorruptEntry, default_root

__all__ = ["Cache", "CacheEntry", "CorruptEntry", "cache_key", "key_parts", "default_root"]
