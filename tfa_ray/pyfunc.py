"""The ``mlflow.pyfunc`` face of a tfa-ray model package, logged *from code*: the registered
model holds a two-line file that instantiates :class:`TFAPyfuncModel`, so nothing of ours is
pickled; ``load_context`` reads the package (safetensors + JSON + PNG) with tfa-ray's loader.
"""

from __future__ import annotations

import io
import os

import pandas as pd  # the type hint below keeps MLflow from warning in every process

PACKAGE_ARTIFACT = "package"  # key of the package directory in the pyfunc model's artifacts

try:  # mlflow is a hard dependency; the guard only keeps import errors readable
    from mlflow.pyfunc import PythonModel as _PythonModel
except ImportError:  # pragma: no cover
    _PythonModel = object  # type: ignore[assignment,misc]


class TFAPyfuncModel(_PythonModel):
    """``mlflow.pyfunc`` face of a tfa-ray package.

    ``predict`` takes a DataFrame with one column of images -- ``image`` (or ``path`` /
    ``bytes``, else the first column): local paths, ``s3://`` URLs or encoded image bytes -- and
    returns one row per image: ``score``, ``threshold``, ``is_anomalous`` and ``mask`` (PNG
    bytes of the defect mask at the model's input size), plus ``status`` (``ok`` / ``error``)
    and ``error`` (undecodable images become error rows, not exceptions).
    """

    batch_size = 16

    def load_context(self, context) -> None:
        from tfa_ray.package import load_model

        device = os.environ.get("TFA_RAY_DEVICE") or "cpu"
        self.model = load_model(context.artifacts[PACKAGE_ARTIFACT], device=device)

    def predict(self, context, model_input: pd.DataFrame, params=None):  # noqa: ARG002 - mlflow's signature
        import numpy as np
        import torch
        from PIL import Image

        from tfa_ray import storage
        from tfa_ray.calibration import is_anomalous
        from tfa_ray.data import decode_image, image_to_tensor

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame({"image": list(model_input)})
        col = next((c for c in ("image", "path", "bytes") if c in model_input.columns), None)
        values = list(model_input[col if col is not None else model_input.columns[0]])
        size = self.model.image_size
        cal = self.model.calibration
        rows: list[dict] = [{} for _ in values]
        good: list[tuple[int, torch.Tensor]] = []
        for i, v in enumerate(values):
            try:
                data = bytes(v) if isinstance(v, (bytes, bytearray, memoryview)) else None
                if data is None:
                    data = storage.read_bytes(str(v))
                good.append((i, image_to_tensor(decode_image(data), size)))
            except Exception as e:  # noqa: BLE001 - a bad input is an error row
                rows[i] = {"status": "error", "error": f"{type(e).__name__}: {e}"}
        for start in range(0, len(good), self.batch_size):
            chunk = good[start : start + self.batch_size]
            maps, scores = self.model.predict(torch.stack([t for _, t in chunk]))
            maps = maps.float().cpu().numpy()
            for (i, _), amap, score in zip(chunk, maps, scores.float().cpu().tolist(), strict=True):
                buf = io.BytesIO()
                mask = ((amap > cal.pixel_threshold) * 255).astype(np.uint8)
                Image.fromarray(mask).save(buf, format="PNG")
                rows[i] = {
                    "score": float(score),
                    "is_anomalous": is_anomalous(score, cal.threshold),
                    "mask": buf.getvalue(),
                    "status": "ok",
                    "error": None,
                }
        out = pd.DataFrame(
            {
                "score": [r.get("score", float("nan")) for r in rows],
                "threshold": [float(cal.threshold)] * len(rows),
                "is_anomalous": [r.get("is_anomalous", False) for r in rows],
                "mask": [r.get("mask") for r in rows],
                "status": [r["status"] for r in rows],
                "error": [r.get("error") for r in rows],
            }
        )
        return out


MODEL_CODE = """\
# tfa-ray pyfunc entry point (MLflow "models from code"): nothing here is pickled.
import mlflow

from tfa_ray.pyfunc import TFAPyfuncModel

mlflow.models.set_model(TFAPyfuncModel())
"""
