"""The precision policy, one for every forward pass that trains, selects, calibrates or scores.

"auto" is bf16 autocast on CUDA devices that run bf16 natively (compute capability 8.0+:
Ampere and later), fp16 autocast on older CUDA devices and fp32 elsewhere; "bf16" also
autocasts on CPUs (about 1.7x faster on CPUs with bf16 instructions, same AUROCs on
magnetic_tile: benchmarks/forward.py); "fp32" never autocasts. Anomaly maps are computed in fp32
whatever the autocast (Detector.evidence). Calibration computes at each precision a scorer may
run at (:func:`autocast_at`), so every threshold is compared with scores computed its way.
"""

from __future__ import annotations

import contextlib

import torch

from tfa_ray.config import PRECISIONS

NATIVE_BF16_CAPABILITY = (8, 0)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively (on older GPUs it is emulated, slowly)."""
    return torch.cuda.get_device_capability(device) >= NATIVE_BF16_CAPABILITY


def autocast_dtype(
    precision: str, device: str | torch.device, training: bool = False
) -> torch.dtype | None:
    """The autocast dtype ``precision`` means on ``device`` (None: fp32, no autocast).

    ``training``: fp16 becomes fp32, since fp16 gradients underflow without loss scaling, which
    the training loop does not do; bf16 keeps fp32's range and needs none."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "auto":
        if device.type != "cuda":
            return None
        dtype = torch.bfloat16 if native_bf16(device) else torch.float16
    else:
        dtype = torch.bfloat16 if precision == "bf16" else None
    if training and dtype == torch.float16:
        return None
    return dtype


def precision_key(precision: str, device: str | torch.device) -> str:
    """The calibration entry ``precision`` computes at on ``device``: "fp32", "bf16" or
    "fp16" (inference: fp16 stays fp16)."""
    dtype = autocast_dtype(precision, device)
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


class HalfConvOnCpu(torch.overrides.TorchFunctionMode):
    """fp16 convolutions on a CPU as a GPU's fp16 autocast computes them: operands rounded to
    fp16, products accumulated in fp32, the result rounded to fp16. A CPU has only a reference
    kernel for fp16 convolutions (cpu-small's backbone ran 19x slower than in fp32 on two
    cores); this gives the same numbers at fp32 speed, so the fp16 calibration stays cheap."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.conv2d or not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        x, weight, *rest = args
        bias = rest[0] if rest else kwargs.pop("bias", None)
        rest = rest[1:]
        half = lambda t: t if t is None else t.to(torch.float16).float()  # noqa: E731
        with torch.autocast("cpu", enabled=False):
            out = func(half(x), half(weight), half(bias), *rest, **kwargs)
        return out.to(torch.float16)


def autocast_at(key: str, device: str | torch.device):
    """The autocast context of a calibration precision (:func:`precision_key`): calibration
    computes at each precision a scorer may run at, fp16 included (on a CPU with its
    convolutions as :class:`HalfConvOnCpu` computes them)."""
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if key not in dtypes:
        raise ValueError(f"precision must be one of {tuple(dtypes)}, got {key!r}")
    device = torch.device(device)
    dtype = dtypes[key]
    cast = torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    if dtype is torch.float16 and device.type == "cpu":
        return _half_on_cpu(cast)
    return cast


@contextlib.contextmanager
def _half_on_cpu(cast):
    with cast, HalfConvOnCpu():
        yield


def autocast(precision: str, device: str | torch.device, training: bool = False):
    """The autocast context that ``precision`` means on ``device`` (see :func:`autocast_dtype`):
    the one policy for training, selection, calibration, evaluation and scoring."""
    device = torch.device(device)
    dtype = autocast_dtype(precision, device, training)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
