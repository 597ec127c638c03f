"""The meta-model as an MLflow ``pyfunc`` model: one few-shot task in, the query's predictions out.

Input: a table (a pandas DataFrame; JSON ``dataframe_split`` or ``dataframe_records`` over
HTTP), one row per image, columns (:func:`input_schema`)

=========  ========  ==========================================================================
``role``   string    ``support`` or ``query``
``label``  string    the class of a support image (required there); of a query image, optional
                     (given for every query image, the output also says which were right)
``path``   string    an image file the model can read, or
``image``  binary    the bytes of an image file (PNG, JPEG, …; base64 in JSON): arrays go
                     through :func:`encode_array`
=========  ========  ==========================================================================

Output: one row per query image: ``row`` (its row in the input), ``file`` (its path, or
``row <n>``), ``label`` when given, ``predicted``, then ``prob_<class>`` per support class.
Optional inference parameter ``batch_size`` (0: the card's). The adaptation is `purer adapt`'s
(:func:`~.adapt.predict`); ICFIL is not offered here (its knobs are the project's).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from ..errors import UserError
from .adapt import load_meta_model, predict
from .images import FewShotTask, Source

ARTIFACT = "meta_model"  # the artifact folder holding model.safetensors and model.json
STEM = "model"
ROLES = ("support", "query")


def input_schema() -> Any:
    """The input columns (see the module's table), with ``role`` the only one always required."""
    from mlflow.types import ColSpec, Schema

    return Schema([ColSpec("string", "role"), ColSpec("string", "label", required=False),
                   ColSpec("string", "path", required=False), ColSpec("binary", "image", required=False)])


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec

    return ModelSignature(inputs=input_schema(), params=ParamSchema([ParamSpec("batch_size", "long", 0)]))


def encode_array(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image array (H, W), (H, W, 3) or (H, W, 4), for the ``image`` column."""
    out = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _text(value: Any) -> str | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) or value == "" else str(value)


def _source(row: Any, i: int) -> Source:
    path, data = _text(row.get("path")), row.get("image")
    if path is not None:
        return Source(path, path=Path(path))
    if isinstance(data, (bytes, bytearray)) and data:
        return Source(f"row {i}", data=bytes(data))
    raise UserError(f"row {i} has neither a path nor image bytes: give one of them.")


def task_from_frame(frame: pd.DataFrame) -> FewShotTask:
    """The task a table describes; support classes sorted by name, as `purer adapt` sorts folders."""
    rows = list(frame.to_dict("records"))
    roles = [_text(r.get("role")) for r in rows]
    bad = [i for i, role in enumerate(roles) if role not in ROLES]
    if bad:
        raise UserError(f"row {bad[0]} has role {roles[bad[0]]!r}: use 'support' or 'query'.")
    support = [(i, r) for i, r in enumerate(rows) if roles[i] == "support"]
    query = [(i, r) for i, r in enumerate(rows) if roles[i] == "query"]
    unlabelled = [i for i, r in support if _text(r.get("label")) is None]
    if unlabelled:
        raise UserError(f"support row {unlabelled[0]} has no label: every support image needs its class.")
    classes = sorted({_text(r["label"]) for _, r in support})
    if len(classes) < 2:
        raise UserError(f"the support has {len(classes)} class(es); a few-shot task needs at least 2.")
    if not query:
        raise UserError("the task has no query row: add the images to classify (role 'query').")
    labels = [_text(r.get("label")) for _, r in query]
    known = None
    if all(label is not None for label in labels):
        unknown = [label for label in labels if label not in classes]
        if unknown:
            raise UserError(f"query label {unknown[0]!r} is not a support class ({', '.join(classes)}).")
        known = [classes.index(label) for label in labels]
    support_labels = [classes.index(_text(r["label"])) for _, r in support]
    return FewShotTask(classes, [_source(r, i) for i, r in support], support_labels,
                       [_source(r, i) for i, r in query], known)


class MetaModelPyfunc(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper: loads the meta-model from its artifact folder, predicts one task per call."""

    def load_context(self, context: Any) -> None:
        self.meta = load_meta_model(Path(context.artifacts[ARTIFACT]) / STEM)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        task = task_from_frame(pd.DataFrame(model_input))
        result = predict(self.meta, task, batch_size=int((params or {}).get("batch_size") or 0))
        table = result.table()
        query_rows = [i for i, role in enumerate(pd.DataFrame(model_input)["role"]) if role == "query"]
        return pd.DataFrame({"row": query_rows, **table})


def example_frame(size: int = 8) -> pd.DataFrame:
    """A two-class task of solid-colour images: the logged model's input example."""
    def png(value: int) -> bytes:
        return encode_array(np.full((size, size, 3), value, dtype=np.uint8))

    return pd.DataFrame({"role": ["support", "support", "query", "query"],
                         "label": ["dark", "light", "", ""],
                         "path": ["", "", "", ""],
                         "image": [png(30), png(220), png(40), png(200)]})
