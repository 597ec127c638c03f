"""A few-shot classifier as an MLflow ``pyfunc`` model: one few-shot task in, the query's
predictions out. The model is the teachers' ensemble (:mod:`.ensemble`) when its artifacts hold
the pool (:data:`TEACHERS`), else the meta-model (:data:`ARTIFACT`).

Input: a table (a pandas DataFrame; JSON ``dataframe_split`` or ``dataframe_records`` over
HTTP), one row per image, columns (:func:`input_schema`)

=========  ========  ==========================================================================
``role``   string    ``support`` or ``query``
``label``  string    the class of a support image (required there); of a query image, optional
                     (given for every query image, the output also says which were right)
``image``  binary    the bytes of an image file (PNG, JPEG, …; base64 in JSON): arrays go
                     through :func:`encode_array`, or
``path``   string    an image file under the folder named by ``PURER_SERVE_IMAGE_ROOT`` in the
                     serving process's environment (relative to it, or absolute); unset (the
                     default), paths are refused: a client must not open files on the server
=========  ========  ==========================================================================

A request is bounded (:data:`MAX_ROWS` images of at most :data:`MAX_IMAGE_BYTES` bytes and
:data:`~purer_mlops.data.dataset.MAX_IMAGE_PIXELS` pixels each), and a refused one raises
:class:`RequestError`: one line, HTTP 400, no stack trace, and the server goes on serving.

Output: one row per query image: ``row`` (its row in the input), ``file`` (its path, or
``row <n>``), ``label`` when given, ``predicted``, then ``prob_<class>`` per support class.
Optional inference parameter ``batch_size`` (0: the model's). The predictions are `purer adapt`'s
(:func:`~.adapt.predict`); ICFIL is not offered here (its knobs are the project's).
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

from ..errors import UserError
from .adapt import load_meta_model, predict
from .ensemble import load_ensemble
from .images import FewShotTask, Source

ARTIFACT = "meta_model"  # the artifact folder holding model.safetensors and model.json
TEACHERS = "teachers"  # the artifact folder holding the teachers' pool (pool.json, teacher_*.safetensors)
STEM = "model"
ROLES = ("support", "query")
IMAGE_ROOT = "PURER_SERVE_IMAGE_ROOT"  # the one folder whose files a request may name by path
MAX_ROWS = 5000  # images per request: a 5-way task with hundreds of queries fits many times over
MAX_IMAGE_BYTES = 16 * 2**20  # one encoded image

LOG = logging.getLogger(__name__)


class RequestError(MlflowException):
    """A request the model refuses: HTTP 400 with this one line as the whole message.

    MLflow's scoring server rewrites ``message`` of an error raised by ``predict`` to prefix it
    with the request's whole table ("Failed to predict data '…'"); this error keeps the line it
    was raised with, so the client reads what to fix and the request is not echoed back.
    """

    def __init__(self, line: str) -> None:
        self._line = line
        super().__init__(line, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, value: str) -> None:  # MlflowException's own __init__ sets it; later rewrites are dropped
        pass


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


def image_root() -> Path | None:
    """The folder of ``PURER_SERVE_IMAGE_ROOT`` (resolved), or None when paths are off."""
    folder = os.environ.get(IMAGE_ROOT, "")
    if not folder:
        return None
    root = Path(folder).resolve()
    if not root.is_dir():
        raise UserError(f"{IMAGE_ROOT}={folder} is not a folder: name an existing folder, or unset it.")
    return root


def _served_path(path: str, i: int, root: Path | None) -> Path:
    """``path`` resolved (links followed) inside ``root``; anything else is refused without
    saying whether such a file exists."""
    if root is None:
        raise UserError(f"row {i} names a file path; this model reads image bytes only: send the image in the "
                        f"'image' column (or start the server with {IMAGE_ROOT}=<folder> to allow paths under it).")
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise UserError(f"row {i} names a path outside the served image folder: send the image's bytes in the "
                        "'image' column, or a path under that folder.")
    return resolved


def _source(row: Any, i: int, root: Path | None) -> Source:
    path, data = _text(row.get("path")), row.get("image")
    if path is not None:
        return Source(path, path=_served_path(path, i, root))
    if isinstance(data, (bytes, bytearray)) and data:
        if len(data) > MAX_IMAGE_BYTES:
            raise UserError(f"row {i}'s image has {len(data)} bytes, over the {MAX_IMAGE_BYTES // 2**20} MiB a "
                            "request may send per image: downscale or recompress it.")
        return Source(f"row {i}", data=bytes(data))
    raise UserError(f"row {i} has neither image bytes nor a path: give one of them.")


def task_from_frame(frame: pd.DataFrame) -> FewShotTask:
    """The task a table describes; support classes sorted by name, as `purer adapt` sorts folders."""
    if len(frame) > MAX_ROWS:
        raise UserError(f"the request has {len(frame)} rows, over the {MAX_ROWS} images one task may hold: "
                        "send the query images in several requests.")
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
    root = image_root()
    return FewShotTask(classes, [_source(r, i, root) for i, r in support], support_labels,
                       [_source(r, i, root) for i, r in query], known)


class FewShotPyfunc(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper: loads the model from its artifact folder, predicts one task per call."""

    def load_context(self, context: Any) -> None:
        artifacts = context.artifacts
        self.model = (load_ensemble(Path(artifacts[TEACHERS])) if TEACHERS in artifacts
                      else load_meta_model(Path(artifacts[ARTIFACT]) / STEM))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """The query rows' predictions; a request it cannot answer raises :class:`RequestError`."""
        try:
            frame = pd.DataFrame(model_input)
            result = predict(self.model, task_from_frame(frame), batch_size=int((params or {}).get("batch_size") or 0))
        except UserError as err:
            raise RequestError(str(err)) from None
        except Exception as err:  # a network surface: the client gets one line, the server's log the trace
            LOG.exception("request failed")
            raise RequestError(f"the request could not be answered ({type(err).__name__}): send a table with "
                               "columns role, label and image (see the model's input example).") from None
        query_rows = [i for i, role in enumerate(frame["role"]) if role == "query"]
        return pd.DataFrame({"row": query_rows, **result.table()})


def example_frame(size: int = 8) -> pd.DataFrame:
    """A two-class task of solid-colour images: the logged model's input example."""
    def png(value: int) -> bytes:
        return encode_array(np.full((size, size, 3), value, dtype=np.uint8))

    return pd.DataFrame({"role": ["support", "support", "query", "query"],
                         "label": ["dark", "light", "", ""],
                         "path": ["", "", "", ""],
                         "image": [png(30), png(220), png(40), png(200)]})
