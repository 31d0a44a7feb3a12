"""The scorer actors' model cache beyond its LRU order (tests/test_gpu_scheduling.py has that):
a model larger than the whole bound, which ``cachetools`` refuses, is still kept and usable."""

from __future__ import annotations

from tfa_ray.scoring.cache import ModelCache


def test_an_oversize_model_is_kept_alone_and_usable():
    evicted = []
    cache = ModelCache(100, size=len, on_evict=lambda k, v: evicted.append(k))
    cache.put("a", "x" * 30)
    cache.put("b", "x" * 30)
    cache.put("huge", "h" * 500)  # over the bound: the others go, it stays
    assert evicted == ["a", "b"]
    assert "huge" in cache and len(cache) == 1 and cache.keys() == ["huge"]
    assert cache.get("huge") == "h" * 500 and cache.nbytes == 500
    cache.put("huge", "H" * 400)  # replacing it is not an eviction
    assert evicted == ["a", "b"] and cache.get("huge") == "H" * 400 and cache.nbytes == 400
    cache.put("c", "x" * 10)  # the next model: the oversize one goes, as the least recent
    assert evicted == ["a", "b", "huge"] and cache.keys() == ["c"] and cache.nbytes == 10
    assert cache.get("huge") is None and "huge" not in cache
    cache.put("d", "x" * 80)
    cache.put("d", "x" * 90)  # replaced in place, nothing evicted (c + d = 100 fits)
    assert evicted == ["a", "b", "huge"] and cache.keys() == ["c", "d"] and cache.nbytes == 100
