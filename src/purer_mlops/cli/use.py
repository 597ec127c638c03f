"""Using the trained models: `purer adapt` labels the query of a user's few-shot task (with the
teachers' ensemble by default, or the meta-model adapted to the task); `purer serve` answers such
tasks over HTTP."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import click

from .options import QUIET, echo_json

DEFAULT_MODEL = Path("models") / "meta" / "best"
DEFAULT_TEACHERS = Path("models") / "teachers"
MODELS = ("teachers-ensemble", "meta-model")  # the first is the default (docs/adapt.md says why)


def register(cli: click.Group) -> None:
    """Add the commands that use a trained meta-model to ``cli``."""
    cli.add_command(adapt)
    cli.add_command(serve)


def csv_text(columns: dict[str, list]) -> str:
    """Equal-length columns as CSV text with a header row (file names may hold commas)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(zip(*columns.values(), strict=True))
    return out.getvalue()


def model_files(model: str) -> tuple[str, Path]:
    """``--model``: the kind (:data:`MODELS`) and its files, a pool's folder or a meta-model's stem."""
    if model in MODELS:
        return model, DEFAULT_TEACHERS if model == MODELS[0] else DEFAULT_MODEL
    path = Path(model)
    if (path / "pool.json").is_file():
        return MODELS[0], path
    return MODELS[1], path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


@click.command()
@click.argument("support", type=click.Path(path_type=Path))
@click.argument("query", type=click.Path(path_type=Path))
@click.option("--model", default=MODELS[0], show_default=True,
              help="teachers-ensemble: the pool's teachers (models/teachers), nearest prototype, one forward pass "
                   "per teacher (the most accurate); meta-model: models/meta/best adapted to the support; or a "
                   "path: a pool's folder (holding pool.json), or a meta-model <MODEL>(.safetensors, its card .json).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("predictions.csv"),
              show_default=True, help="The predictions CSV: file, (label), predicted, prob_<class>...")
@click.option("--icfil", is_flag=True,
              help="With --model meta-model: calibrate with ICFIL after the inner loop (knobs from --params).")
@click.option("--params", "params_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where --icfil reads calibration.*, inversion.tv/l2 and metatest.seed "
                   "[default: ./params.yaml if present, else the declared defaults].")
@click.option("--batch-size", type=click.IntRange(min=0), default=0, show_default=True,
              help="Query images per batch; 0: the card's query_batch (a meta-test query set's size).")
@QUIET
def adapt(support: Path, query: Path, model: str, out: Path, icfil: bool, params_path: Path | None,
          batch_size: int, quiet: bool) -> None:
    """Label the images of QUERY from the labelled images of SUPPORT.

    \b
    SUPPORT/<class>/<image>: a few labelled images per class (2 classes or more).
    QUERY/<image> or QUERY/<class>/<image> (then the accuracy is reported too).
    Images of any size and mode Pillow reads are decoded and normalised as the model's
    dataset was. The default model is the teachers' ensemble (nearest prototype in each
    teacher's embedding, probabilities averaged); --model meta-model adapts the meta-model as
    meta-testing does (the card's inner loop). On CUDA when present (CUDA_VISIBLE_DEVICES= for
    the CPU). Writes OUT (one row per query image) and prints a summary; bad input stops with
    one line, exit 2, nothing written.
    """
    from ..config import from_dict, load_params
    from ..distributed import pick_device
    from ..fileio import write_text
    from ..serve.adapt import load_meta_model, predict
    from ..serve.ensemble import load_ensemble
    from ..serve.images import read_task

    task = read_task(support, query)
    kind, path = model_files(model)
    device = pick_device("auto")
    served = load_ensemble(path, device) if kind == MODELS[0] else load_meta_model(path, device)
    settings = None
    if icfil:
        path = params_path or Path("params.yaml")
        settings = load_params(path) if params_path or path.is_file() else from_dict({})
    result = predict(served, task, batch_size=batch_size, icfil=settings, progress=not quiet)
    write_text(out, csv_text(result.table()))
    summary = {"model": kind, **({"teachers": len(served.card["teachers"])} if kind == MODELS[0] else
                                  {"meta_learner": served.card["meta_learner"], "icfil": icfil}),
               "classes": task.classes, "support": len(task.support), "queries": len(task.query),
               "predictions": str(out)}
    accuracy = result.accuracy()
    if accuracy is not None:
        summary["accuracy"] = accuracy
    echo_json(summary)


@click.command()
@click.argument("model_uri")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="The address to listen on; 0.0.0.0 opens the server to the network.")
@click.option("--port", type=click.IntRange(1, 65535), default=5001, show_default=True)
@click.option("--max-request-mb", type=click.FloatRange(min=0, min_open=True), default=64.0, show_default=True,
              help="The largest request body taken; a larger one is refused (HTTP 413) before it is read.")
@click.option("--image-root", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Let requests name image files by path, under this folder only [default: image bytes only].")
def serve(model_uri: str, host: str, port: int, max_request_mb: float, image_root: Path | None) -> None:
    """Serve the logged model MODEL_URI (models:/<name>@<alias>, models:/<id>, runs:/<run>/meta_model,
    a folder) over HTTP: `mlflow models serve`'s /invocations, with every request bounded.

    \b
    Takes the JSON of `mlflow models serve` (docs/adapt.md); a refused request gets HTTP 4xx
    and one line, and the server goes on. Set MLFLOW_TRACKING_URI for models:/ and runs:/ URIs.
    """
    import os

    from ..serve.http import serve as serve_http
    from ..serve.pyfunc import IMAGE_ROOT

    if image_root is not None:
        os.environ[IMAGE_ROOT] = str(image_root.resolve())
    else:
        os.environ.pop(IMAGE_ROOT, None)
    serve_http(model_uri, host, port, int(max_request_mb * 2**20))
