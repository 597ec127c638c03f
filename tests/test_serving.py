"""The served meta-model is a network surface: what a request may make the server do.

In process (the pyfunc class the server calls) and through a real `mlflow models serve` on
127.0.0.1 (tests/test_adapt_mlflow.py):
- a row naming a file path is refused unless ``PURER_SERVE_IMAGE_ROOT`` names a folder, and the
  answer is the same whether such a file exists or not; with the folder set, only paths that
  resolve inside it (after ``..`` and links) are read, and they predict what the bytes predict;
- a request is bounded: rows, bytes per image, pixels per image (a small PNG whose header says
  20000 x 20000 is refused before it is decoded);
- every refusal is one line (`RequestError`, HTTP 400), also for a failure the model did not
  foresee, and the model answers the next good request.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import adapt_params, lay_out_task
from PIL import Image

from purer_mlops.meta.scoring import fixed_test_tasks
from purer_mlops.paths import Project
from purer_mlops.serve import pyfunc
from purer_mlops.serve.adapt import load_meta_model


@pytest.fixture(scope="module")
def served(adapt_project: Path) -> pyfunc.FewShotPyfunc:
    model = pyfunc.FewShotPyfunc()
    model.model = load_meta_model(Project(adapt_project).meta.best)
    return model


@pytest.fixture(scope="module")
def task_folder(adapt_project: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    params = adapt_params(num_sup_test=1, episode_test=1)
    test, tasks = fixed_test_tasks(params, Project(adapt_project), 1)
    return lay_out_task(test, tasks[0], tmp_path_factory.mktemp("served_task"))


def frame(support: Path, query: Path, by_path: bool = False) -> pd.DataFrame:
    """The task as the model's input table: every image as bytes, or the support by path."""
    rows = [{"role": "support", "label": f.parent.name, "path": str(f) if by_path else "",
             "image": b"" if by_path else f.read_bytes()} for f in sorted(support.glob("*/*.png"))]
    rows += [{"role": "query", "label": f.parent.name, "path": "", "image": f.read_bytes()}
             for f in sorted(query.glob("*/*.png"))]
    return pd.DataFrame(rows)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def refusal(model: pyfunc.FewShotPyfunc, table: pd.DataFrame, params: dict | None = None) -> str:
    """The one line a refused request answers with (and the HTTP status it maps to)."""
    with pytest.raises(pyfunc.RequestError) as info:
        model.predict(None, table, params)
    message = info.value.message
    assert "\n" not in message and "Traceback" not in message
    assert info.value.get_http_status_code() == 400
    info.value.message = f"Failed to predict data '{table}'. \nError: {message}"  # what MLflow's server does
    assert info.value.message == message
    return message


def with_support_path(table: pd.DataFrame, path: str) -> pd.DataFrame:
    table = table.copy()
    table.loc[0, ["path", "image"]] = [path, b""]
    return table


def test_paths_are_refused_by_default_and_existence_is_not_told(served, task_folder, monkeypatch, tmp_path):
    monkeypatch.delenv(pyfunc.IMAGE_ROOT, raising=False)
    table = frame(*task_folder)
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(Image.new("RGB", (8, 8))))
    answers = {refusal(served, with_support_path(table, p)) for p in (str(secret), str(tmp_path / "missing.png"),
                                                                        "/etc/passwd")}
    (answer,) = answers  # the same line whatever the file
    assert "image bytes only" in answer and pyfunc.IMAGE_ROOT in answer
    assert len(served.predict(None, table)) == len(table) - 5  # the next good request is answered


def test_paths_under_the_image_root_predict_what_the_bytes_predict(served, task_folder, monkeypatch, tmp_path):
    support, query = task_folder
    monkeypatch.setenv(pyfunc.IMAGE_ROOT, str(support.parent))
    by_bytes = served.predict(None, frame(support, query))
    by_path = served.predict(None, frame(support, query, by_path=True))
    probs = [c for c in by_bytes.columns if c.startswith("prob_")]
    assert np.array_equal(by_path[probs].to_numpy(), by_bytes[probs].to_numpy())

    outside = tmp_path / "outside.png"
    outside.write_bytes(next(support.glob("*/*.png")).read_bytes())
    link = support / "link.png"
    link.symlink_to(outside)
    try:
        escapes = [str(outside), f"{support.name}/../../{outside.parent.name}/outside.png", str(link)]
        for path in escapes:
            assert "outside the served image folder" in refusal(served, with_support_path(frame(support, query), path))
    finally:
        link.unlink()


def test_a_missing_image_root_folder_is_one_line(served, task_folder, monkeypatch, tmp_path):
    monkeypatch.setenv(pyfunc.IMAGE_ROOT, str(tmp_path / "nowhere"))
    assert "is not a folder" in refusal(served, frame(*task_folder))


def test_a_request_is_bounded(served, task_folder, monkeypatch):
    table = frame(*task_folder)
    monkeypatch.setattr(pyfunc, "MAX_ROWS", len(table) - 1)
    assert f"{len(table)} rows" in refusal(served, table)
    monkeypatch.setattr(pyfunc, "MAX_ROWS", len(table))
    monkeypatch.setattr(pyfunc, "MAX_IMAGE_BYTES", 10)
    assert "bytes" in refusal(served, table) and "recompress" in refusal(served, table)


@pytest.mark.parametrize("side, words", [(8000, ["8000x8000", "megapixels"]), (20000, ["million pixels"])])
def test_an_image_over_the_pixel_bound_is_refused_before_decoding(served, task_folder, side, words):
    table = frame(*task_folder)
    table.loc[len(table) - 1, "image"] = png(Image.new("1", (side, side)))  # a small file, a huge image
    answer = refusal(served, table)
    assert all(w in answer for w in words) and f"row {len(table) - 1}" in answer


def test_an_unforeseen_failure_is_one_line_too(served, task_folder):
    answer = refusal(served, frame(*task_folder), {"batch_size": "many"})
    assert "ValueError" in answer and "input example" in answer
