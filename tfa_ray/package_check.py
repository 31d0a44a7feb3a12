"""Is a model package usable? Checked before a scoring run relies on it, without loading it.

A package that fails here is broken for good (a truncated ``weights.safetensors``, a
``calibration.json`` that does not parse to numbers, a ``config.json`` with fields this
version does not know): no rerun fixes it, so its rows are *permanent* errors that name the
model and version. I/O errors while reading are not judged here: they propagate unchanged
and stay transient.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from tfa_ray import storage
from tfa_ray.calibration import Calibrations
from tfa_ray.choices import SELECTION_FILE, InferenceChoice

# the fields a calibration entry needs as numbers (tfa_ray.calibration.Calibration)
CALIBRATION_NUMBERS = (
    "threshold",
    "target_fpr",
    "score_mean",
    "score_std",
    "map_low",
    "map_high",
    "pixel_threshold",
)


class PackageError(ValueError):
    """A model package that cannot be used (permanently): the message says which file and why."""


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_weights(data: bytes) -> None:
    """A safetensors file is whole: its header parses and its tensors end where the file ends."""
    if len(data) < 8:
        raise PackageError(f"weights.safetensors is truncated ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise PackageError(
            f"weights.safetensors is truncated: header of {n} bytes, file of {len(data)}"
        )
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as e:
        raise PackageError(f"weights.safetensors has an unreadable header: {e}") from None
    ends = [
        int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and "dtype" in v
    ]
    expected = 8 + n + max(ends, default=0)
    if expected != len(data):
        raise PackageError(
            f"weights.safetensors is truncated or padded: {len(data)} bytes, the header "
            f"describes {expected}"
        )


def check_calibration(data: dict[str, Any], where: str = "calibration.json") -> None:
    """Every entry parses to numbers: flat (``threshold``, ...) or keyed by precision
    (``{"fp32": {...}, "bf16": {...}}``), nested entries checked the same way."""
    if not isinstance(data, dict):
        raise PackageError(f"{where} is not a JSON object")
    if "threshold" not in data:
        nested = {k: v for k, v in data.items() if isinstance(v, dict)}
        if not nested:
            raise PackageError(f"{where} has no threshold")
        for key, value in nested.items():
            check_calibration(value, f"{where}[{key!r}]")
        return
    for key in CALIBRATION_NUMBERS:
        if key in data and not _number(data[key]):
            raise PackageError(f"{where}: {key} is not a number: {data[key]!r}")
    for key, value in data.items():
        if isinstance(value, dict):
            check_calibration(value, f"{where}[{key!r}]")
        elif isinstance(value, list):
            if not all(_number(v) for v in value):
                raise PackageError(f"{where}: {key} holds values that are not numbers")
        # other scalars (a label, a note) are not numbers the decision needs


def check_package(url: str | storage.Location, endpoint_url: str | None = None) -> None:
    """Raise :class:`PackageError` when the package at ``url`` (a URL, or a location already
    resolved) cannot be used; OSErrors while reading it propagate (they may pass)."""
    from tfa_ray.config import preset_from_json

    package = storage.locate(url, endpoint_url)

    def read(name: str) -> bytes:
        return package.join(name).read_bytes()

    try:
        preset_from_json(read("config.json").decode())
    except (ValueError, TypeError) as e:  # JSON errors, unknown fields
        raise PackageError(f"config.json: {e}") from None
    text = read("calibration.json")
    try:
        calibration = json.loads(text)
    except ValueError as e:
        raise PackageError(f"calibration.json is not JSON: {e}") from None
    check_calibration(calibration)
    try:  # numbers everywhere, and the structure the loader expects (an fp32 entry, ...)
        Calibrations.from_json(text.decode())
    except (ValueError, TypeError, KeyError) as e:
        raise PackageError(f"calibration.json: {e}") from None
    check_weights(read("weights.safetensors"))
    if package.join(SELECTION_FILE).exists():  # older packages have none
        try:
            InferenceChoice.from_json(read(SELECTION_FILE).decode())
        except (ValueError, TypeError, KeyError) as e:
            raise PackageError(f"{SELECTION_FILE}: {e}") from None
