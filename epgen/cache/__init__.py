"""Content-addressed on-disk cache of compiled kernels (design.md, Cache key details)."""
from .key import cache_key, key_parts
from .store import Cache, CacheEntry, CorruptEntry, default_root

__all__ = ["Cache", "CacheEntry", "CorruptEntry", "cache_key", "key_parts", "default_root"]
