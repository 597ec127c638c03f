"""A look at the MLflow UI as a user gets it: `purer ui` (`mlflow ui`) on 127.0.0.1 over the store of two
tiny meta-training runs, opened in headless Chromium (Debian's `chromium` and
`chromium-driver`; `.ci/run` installs them where it can, this module skips where it could not).

Checked on the pages: the experiment opens in the model-training view (its runs, the Model
registry; not the GenAI view's "Evaluation runs") at the address `purer ui` prints; the run
page lists the val-accuracy metric and the logged model; its model-metrics tab draws the
val-accuracy curve and the bank image series; the compare view holds both runs. Screenshots
of the run page and the compare view go to ``tmp_path``, or to the folder in
``PURER_SCREENSHOTS`` (``PURER_SCREENSHOTS=docs/images pytest tests/test_browser.py`` refreshes
the ones in docs/tracking.md).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from conftest import BIN, background, copy_project, free_port, run_purer, tiny_raw, write_yaml

from purer_mlops.tracking.store import MODEL_TRAINING_VIEW

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
if not (CHROMIUM.exists() and DRIVER.exists()):
    pytest.skip("Chromium is not installed: apt-get install chromium chromium-driver (as root; .ci/run does)",
                allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory, pool_project) -> dict:
    """Two tracked tiny meta-training runs (adv_scale 10 and 0.5) in one project's store."""
    root = copy_project(pool_project, tmp_path_factory.mktemp("browser") / "project")
    for adv in (10.0, 0.5):
        write_yaml(root, tiny_raw(tracking=True, adv_scale=adv, experiment_name="browser"))
        proc = run_purer(root, "metatrain", "--quiet")
        assert proc.returncode == 0, proc.stderr
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("browser")
    runs = client.search_runs([experiment.experiment_id], "tags.`purer.stage` = 'metatrain'")
    ids = [r.info.run_id for r in runs]
    assert len(ids) == 2
    return {"root": root, "experiment": experiment.experiment_id, "runs": ids}


@pytest.fixture(scope="module")
def ui(store) -> str:
    """`purer ui` (`mlflow ui` on the project's store) on a free 127.0.0.1 port; its base URL."""
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [str(BIN / "purer"), "ui", "--port", url.rsplit(":", 1)[1]]
    with background(cmd, f"{url}/health", store["root"] / "ui.log", cwd=store["root"]):
        yield url


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1800"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("PURER_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def page_text(driver, url: str, *words: str) -> str:
    """Open ``url`` and wait (60 s) until the page's text holds every word; returns the text."""
    driver.get(url)
    try:
        WebDriverWait(driver, 60).until(lambda d: all(w in d.find_element(By.TAG_NAME, "body").text for w in words))
    except Exception:
        missing = [w for w in words if w not in driver.find_element(By.TAG_NAME, "body").text]
        pytest.fail(f"{url} never showed {missing}")
    return driver.find_element(By.TAG_NAME, "body").text


MODEL_TRAINING = f"?{MODEL_TRAINING_VIEW}"  # what `purer ui` prints: MLflow 3.17 picks the view from it


def run_url(ui: str, store: dict, tab: str = "") -> str:
    return f"{ui}/#/experiments/{store['experiment']}/runs/{store['runs'][0]}{tab}{MODEL_TRAINING}"


def test_purer_ui_opens_the_experiment_in_the_model_training_view(ui, store, browser):
    printed = re.search(r"open (\S+)", (store["root"] / "ui.log").read_text()).group(1)
    assert printed == f"{ui}/#/experiments/{store['experiment']}{MODEL_TRAINING}"
    text = page_text(browser, printed, "Model registry", "2 matching runs")
    assert "Evaluation runs" not in text and "Observability" not in text  # the GenAI view's navigation


def test_run_page_lists_val_accuracy_and_the_logged_model(ui, store, browser, shots):
    text = page_text(browser, run_url(ui, store), "val_accuracy", "Logged models", "meta_model")
    assert "Evaluation runs" not in text  # still the model-training view
    browser.save_screenshot(str(shots / "mlflow-run.png"))


def test_model_metrics_tab_draws_the_curve_and_the_bank_images(ui, store, browser, shots):
    browser.set_window_size(1400, 3600)  # the tab draws only the charts in view: all of them
    page_text(browser, run_url(ui, store, "/model-metrics"), "val_accuracy", "bank")
    assert WebDriverWait(browser, 60).until(
        lambda d: any(img.get_attribute("src").startswith(("data:image/png", "blob:", "http"))
                      and img.size["width"] > 50 for img in d.find_elements(By.CSS_SELECTOR, "img")))
    browser.save_screenshot(str(shots / "mlflow-metrics.png"))
    browser.set_window_size(1400, 1800)


def test_compare_view_holds_both_runs(ui, store, browser, shots):
    runs = ",".join(f'"{r}"' for r in store["runs"])
    url = f"{ui}/#/compare-runs?runs=[{runs}]&experiments=[\"{store['experiment']}\"]"
    text = page_text(browser, url, "val_accuracy", "adv_scale")
    assert "0.5" in text and "10.0" in text
    browser.save_screenshot(str(shots / "mlflow-compare.png"))

