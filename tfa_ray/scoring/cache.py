"""The scorer actors' model cache: bounded by bytes, least recently used out first.

An actor meets the categories of its shards in any order; a ``paper`` model holds about 0.9 GB
of weights and buffers, so keeping every model ever loaded grows an actor past its GPU's (or
host's) memory on a many-category night. The cache keeps the most recently used models whose
total size fits ``max_bytes``; one model larger than the bound is still kept, alone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

DEFAULT_MAX_BYTES = 4 * 1024**3  # four `paper` models


def model_nbytes(model: Any) -> int:
    """Bytes a loaded TFAModel holds: parameters, buffers and the cached template embedding."""
    import torch

    detector = model.detector
    tensors = [*detector.parameters(), *detector.buffers()]
    cached = getattr(detector, "_e_templates", None)
    if isinstance(cached, torch.Tensor):
        tensors.append(cached)
    return sum(t.numel() * t.element_size() for t in tensors)


class ModelCache:
    """key -> value, at most ``max_bytes`` in total by ``size(value)``; LRU eviction."""

    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_BYTES,
        size: Callable[[Any], int] = model_nbytes,
        on_evict: Callable[[str, Any], None] | None = None,
    ):
        self.max_bytes = int(max_bytes)
        self.size = size
        self.on_evict = on_evict
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[str]:
        """Keys, least recently used first."""
        return list(self._items)

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self._items.values())

    def get(self, key: str) -> Any:
        """The value (now the most recently used), or None."""
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key][0]

    def put(self, key: str, value: Any, nbytes: int | None = None) -> None:
        """Add ``value``, then evict least recently used entries until the rest fits (the new
        one is never evicted: a model larger than the bound is kept alone)."""
        self._items.pop(key, None)
        self._items[key] = (value, self.size(value) if nbytes is None else int(nbytes))
        while len(self._items) > 1 and self.nbytes > self.max_bytes:
            old, (evicted, _) = self._items.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(old, evicted)
