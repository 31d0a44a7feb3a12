"""A simulated CUDA device for tests on CPU-only machines.

``SimCudaTensor`` reports ``device("cuda", 0)`` and ``is_cuda`` while its data stays on the
CPU, and refuses what a real CUDA tensor refuses: an op that mixes it with a non-scalar CPU
tensor, ``.numpy()``, a CPU tensor indexed with it. A ``TorchFunctionMode`` turns
``.to("cuda")``, ``.cuda()``, ``Module.to("cuda")`` and factory calls with ``device="cuda"``
into it; ``.cpu()`` / ``.to("cpu")`` give plain tensors back. While :func:`simulated_cuda` is
active ``torch.cuda.is_available()`` is true (one sm_90 device) and ``torch.autocast("cuda")``
autocasts as it would on a CPU.

It is a ``__torch_function__`` subclass, not a ``_make_wrapper_subclass``: a tensor whose
C++ device is CUDA makes autograd ask the driver for a stream, which a machine without one
cannot answer. So the checks are made at the Python API, where every call of the code under
test passes.

What real CUDA accepts, the simulator lets through: 0-dim CPU tensors in an op
(``cuda_t * torch.tensor(2.0)``), a CUDA tensor indexed with CPU indices, copies between the
two devices.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
ENV = "TFA_SIM_CUDA"  # "1" in a process's environment (a Ray worker): active there from start

_MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu}
# where a CPU tensor may meet a CUDA one on a GPU: copies and assignments into it
_CROSS_DEVICE = {
    torch.Tensor.copy_,
    torch.Tensor.__setitem__,
    torch.Tensor.data.__set__,
    torch.Tensor.grad.__set__,
    torch.Tensor.__reduce_ex__,
    torch._has_compatible_shallow_copy_type,
}


def _plain(t: torch.Tensor) -> torch.Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        return t.as_subclass(torch.Tensor) if isinstance(t, SimCudaTensor) else t


def _sim(t):
    if isinstance(t, torch.Tensor) and not isinstance(t, SimCudaTensor):
        with torch._C.DisableTorchFunctionSubclass():
            return t.as_subclass(SimCudaTensor)  # same data, same autograd graph
    return t


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True
    return torch.device(device).type == "cuda"


def _target(args, kwargs):
    """``Tensor.to(...)``'s arguments as (device or None, kwargs without device and
    non_blocking); ``_to(t, kw)`` then converts the dtype / memory format only."""
    rest, kwargs = list(args[1:]), dict(kwargs)
    device = kwargs.pop("device", None)
    if rest and isinstance(rest[0], (str, torch.device, int)):
        device = rest.pop(0)
    elif rest and isinstance(rest[0], torch.Tensor):  # .to(other): its device and dtype
        other = rest.pop(0)
        device = other.device
        kwargs.setdefault("dtype", other.dtype)
    if rest and (rest[0] is None or isinstance(rest[0], torch.dtype)):
        kwargs.setdefault("dtype", rest.pop(0))
    kwargs.pop("non_blocking", None)
    if rest and isinstance(rest[0], bool):  # non_blocking
        rest.pop(0)
    if rest and isinstance(rest[0], bool):
        kwargs.setdefault("copy", rest.pop(0))
    if kwargs.get("dtype") is None:
        kwargs.pop("dtype", None)
    return device, kwargs


def _to(t: torch.Tensor, kwargs: dict) -> torch.Tensor:
    return torch.Tensor.to(t, **kwargs) if kwargs else t


def _check(func, args, kwargs) -> None:
    """Raise as CUDA does where a non-scalar CPU tensor meets a CUDA one."""
    if func in _CROSS_DEVICE or func in _MOVES:
        return
    if func is torch.Tensor.__getitem__:
        index, _ = tree_flatten(args[1])
        if not isinstance(args[0], SimCudaTensor) and any(
            isinstance(i, SimCudaTensor) for i in index
        ):
            raise RuntimeError(
                "indices should be either on cpu or on the same device as the indexed tensor (cpu)"
            )
        return  # a CUDA tensor indexed with CPU indices: they move to its device
    tensors, _ = tree_flatten((args, kwargs))
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    if any(isinstance(t, SimCudaTensor) for t in tensors) and any(
        not isinstance(t, SimCudaTensor) and t.dim() > 0 for t in tensors
    ):
        name = getattr(func, "__name__", str(func))
        raise RuntimeError(
            "Expected all tensors to be on the same device, but found at least two devices, "
            f"cuda:0 and cpu! (when checking argument for {name})"
        )


class SimCudaTensor(torch.Tensor):
    """A CPU tensor that says it lives on ``cuda:0``."""

    @property
    def device(self) -> torch.device:
        return CUDA

    @property
    def is_cuda(self) -> bool:
        return True

    def numpy(self, *args, **kwargs):
        raise TypeError(
            "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
            "tensor to host memory first."
        )

    def __deepcopy__(self, memo):
        if id(self) not in memo:
            with torch._C.DisableTorchFunctionSubclass():
                copy = _plain(self).detach().clone().requires_grad_(self.requires_grad)
            memo[id(self)] = _sim(copy)
        return memo[id(self)]

    def __reduce_ex__(self, proto):  # saved like a CUDA tensor loaded with map_location="cpu"
        return _plain(self).__reduce_ex__(proto)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        _check(func, args, kwargs)
        if func is torch.Tensor.cpu:
            return _plain(args[0]).clone()
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            device, kw = _target(args, kwargs)
            with torch._C.DisableTorchFunctionSubclass():
                out = _to(_plain(args[0]), kw)
            if device is not None and not _is_cuda(device):
                return out.clone() if _same(out, args[0]) else out  # a copy, as from a GPU
            return _sim(out)
        if func is torch.Tensor.__getitem__:
            args = (args[0], tree_map(_plain, args[1]))
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if func is torch.Tensor.__reduce_ex__:
            return out
        return tree_map(_sim, out)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    with torch._C.DisableTorchFunctionSubclass():
        return a.data_ptr() == b.data_ptr()


class SimCudaMode(TorchFunctionMode):
    """Moves to and factories on ``cuda`` give :class:`SimCudaTensor` (a copy, as on a GPU)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.to, torch.Tensor.cuda) and not isinstance(args[0], SimCudaTensor):
            device, kw = _target(args, kwargs) if func is torch.Tensor.to else (CUDA, {})
            if _is_cuda(device):
                out = _to(args[0], kw)
                return _sim(out.clone() if out is args[0] else out)
        if func is torch.Tensor.pin_memory:
            return args[0]  # page-locked memory needs a driver: the copies are the same here
        if func is torch.Tensor.is_pinned:
            return False
        kwargs.pop("pin_memory", None)
        if _is_cuda(kwargs.get("device")):
            gen = kwargs.get("generator")
            if gen is not None and gen.device.type != "cuda":
                raise RuntimeError("Expected a 'cuda' device type for generator but found 'cpu'")
            kwargs["device"] = "cpu"
            grad = kwargs.pop("requires_grad", False)
            out = tree_map(_sim, func(*args, **kwargs))
            return out.requires_grad_() if grad else out  # a leaf, as made on the device
        return func(*args, **kwargs)


_REAL_AUTOCAST = torch.autocast


class _AutocastAsCpu(_REAL_AUTOCAST):
    """``torch.autocast("cuda", ...)`` autocasts the (CPU) computations as on a CPU."""

    def __init__(self, device_type, *args, **kwargs):
        super().__init__("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


class _Stream:
    """The current stream: never capturing a graph, nothing to wait for."""

    def is_capturing(self) -> bool:
        return False

    def synchronize(self) -> None:
        pass


_REAL_RUN = threading.Thread.run


def _run_with_device(self: threading.Thread) -> None:
    """A thread started while the device is simulated sees it too, as every thread sees a GPU
    (torch function modes are per thread: a prefetch thread would otherwise pin and copy
    without it)."""
    with SimCudaMode():
        _REAL_RUN(self)


def _patches(num_devices: int) -> list[tuple[object, str, object]]:
    cuda = torch.cuda
    return [
        (threading.Thread, "run", _run_with_device),
        (cuda, "is_available", lambda: True),
        (cuda, "device_count", lambda: num_devices),
        (cuda, "current_device", lambda: 0),
        (cuda, "set_device", lambda device: None),
        (cuda, "synchronize", lambda device=None: None),
        (cuda, "empty_cache", lambda: None),
        (cuda, "get_device_capability", lambda device=None: (9, 0)),
        (cuda, "get_device_name", lambda device=None: "simulated CUDA (CPU)"),
        (cuda, "is_bf16_supported", lambda including_emulation=True: True),
        (cuda, "max_memory_allocated", lambda device=None: 0),
        (cuda, "memory_allocated", lambda device=None: 0),
        (cuda, "reset_peak_memory_stats", lambda device=None: None),
        (cuda, "is_current_stream_capturing", lambda: False),
        (cuda, "current_stream", lambda device=None: _Stream()),
        (torch.accelerator, "current_stream", lambda device=None: _Stream()),
        (torch, "autocast", _AutocastAsCpu),
    ]


@contextlib.contextmanager
def simulated_cuda(num_devices: int = 1) -> Iterator[None]:
    """Activate the simulated device for the ``with`` block."""
    patches = _patches(num_devices)
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    swap = torch.__future__.get_swap_module_params_on_conversion()
    for obj, name, value in patches:
        setattr(obj, name, value)
    torch.__future__.set_swap_module_params_on_conversion(True)  # Module.to swaps in subclasses
    try:
        with SimCudaMode():
            yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
        for obj, name, value in saved:
            setattr(obj, name, value)


def activate_from_env() -> None:
    """For a process started elsewhere (a Ray worker, as its ``worker_process_setup_hook``):
    when ``TFA_SIM_CUDA=1``, ``torch.cuda`` answers as a GPU for the rest of the process's
    life, and tensors convert in the calling thread. Torch function modes are per thread: a
    Ray Train loop (its own thread) calls this again first."""
    if os.environ.get(ENV) != "1":
        return
    if not _PROCESS.patched:
        for obj, name, value in _patches(1):
            setattr(obj, name, value)
        torch.__future__.set_swap_module_params_on_conversion(True)
        _PROCESS.patched = True
    if not getattr(_THREAD, "mode", None):
        _THREAD.mode = SimCudaMode()
        _THREAD.mode.__enter__()


class _Flags:
    patched = False


_PROCESS = _Flags()
_THREAD = threading.local()
