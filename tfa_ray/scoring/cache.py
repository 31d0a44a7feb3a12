"""The scorer actors' model cache: bounded by bytes, least recently used out first.

An actor meets the categories of its shards in any order; a ``paper`` model holds about 0.9 GB
of weights and buffers, so keeping every model ever loaded grows an actor past its GPU's (or
host's) memory on a many-category night. The cache keeps the most recently used models whose
total size fits ``max_bytes`` (``cachetools.LRUCache`` by size); one model larger than the bound
is still kept, alone (cachetools refuses it: a scorer must still score with it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cachetools import LRUCache

DEFAULT_MAX_BYTES = 4 * 1024**3  # four `paper` models


def model_nbytes(model: Any) -> int:
    """Bytes a loaded TFAModel holds: parameters, buffers and the cached template embedding."""
    import torch

    detector = model.detector
    tensors = [*detector.parameters(), *detector.buffers()]
    cached = detector.bank.embedded
    if isinstance(cached, torch.Tensor):
        tensors.append(cached)
    return sum(t.numel() * t.element_size() for t in tensors)


class _EvictingLRU(LRUCache):
    """An LRUCache that says what it evicts (``popitem`` is its one way out for an eviction)."""

    def __init__(self, maxsize: int, getsizeof: Callable[[Any], int], on_evict):
        super().__init__(maxsize=maxsize, getsizeof=getsizeof)
        self.on_evict = on_evict

    def popitem(self) -> tuple[str, Any]:
        key, value = super().popitem()
        if self.on_evict is not None:
            self.on_evict(key, value)
        return key, value


class ModelCache:
    """key -> value, at most ``max_bytes`` in total by ``size(value)``; LRU eviction. A value
    over the bound empties the cache and is kept alone, until the next ``put``."""

    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_BYTES,
        size: Callable[[Any], int] = model_nbytes,
        on_evict: Callable[[str, Any], None] | None = None,
    ):
        self.max_bytes = int(max_bytes)
        self.size = size
        self.on_evict = on_evict
        self._lru = _EvictingLRU(self.max_bytes, size, on_evict)
        self._alone: tuple[str, Any, int] | None = None  # (key, value, bytes) over the bound

    def __contains__(self, key: str) -> bool:
        return key in self._lru or (self._alone is not None and self._alone[0] == key)

    def __len__(self) -> int:
        return len(self._lru) + (self._alone is not None)

    def keys(self) -> list[str]:
        """The cached keys."""
        return list(self._lru) + ([self._alone[0]] if self._alone is not None else [])

    @property
    def nbytes(self) -> int:
        return int(self._lru.currsize) + (self._alone[2] if self._alone is not None else 0)

    def get(self, key: str) -> Any:
        """The value (now the most recently used), or None."""
        if self._alone is not None and self._alone[0] == key:
            return self._alone[1]
        return self._lru.get(key)

    def put(self, key: str, value: Any) -> None:
        """Add ``value`` (replacing ``key``'s), evicting least recently used entries until the
        total fits; the new one is never evicted."""
        self._lru.pop(key, None)  # a replaced value is not an eviction
        alone, self._alone = self._alone, None
        if alone is not None and alone[0] != key and self.on_evict is not None:
            self.on_evict(alone[0], alone[1])  # it was the least recently used
        try:
            self._lru[key] = value  # sized once, by the LRUCache
        except ValueError:  # cachetools refuses a value over the bound: empty, keep it alone
            while self._lru:
                self._lru.popitem()
            self._alone = (key, value, int(self.size(value)))
