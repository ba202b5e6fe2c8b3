"""The web app (python -m app): its toolkit module, and a real headless Chromium driving the page.

The browser test needs Debian's chromium + chromium-driver (installed by .ci/run where apt works),
selenium and gradio (requirements-app.txt); without them it is skipped, saying what is missing.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import screenshot_dir
from PIL import Image

from core.errors import InputError
from core.runtime import Runtime
from core.scores import normalized_score
from datasets import AnomalyDataset, BatchLoader, Preprocess, denormalize, list_samples, read_image
from datasets.synthetic import generate
from deploy.visualize import heat_overlay
from models import build_model, model_config

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
K = 32


@pytest.mark.bad_input
def test_check_image_refuses_non_images(tmp_path, demo_root):
    toolkit = pytest.importorskip("app.toolkit")
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    with pytest.raises(InputError, match=r"notes\.txt: not an image file"):
        toolkit.check_image(text)
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"\x89PNG but truncated")
    with pytest.raises(InputError, match="fake.png"):
        toolkit.upload_samples([fake])
    good = sorted((demo_root / "tiles" / "train" / "good").glob("*.png"))[0]
    assert toolkit.check_image(good) == good


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the app did not answer at {url} within {seconds} s")


def _reference(demo_root: Path, category: str, image: Path) -> tuple[float, float, float, np.ndarray]:
    """Threshold, score, normalised score and heat overlay of ``image`` by the model API alone."""
    config = model_config("ortho", arch="resnet18", k=K, image_size=64, resize=64, pretrained="none", seed=0)
    model = build_model(config)
    train = AnomalyDataset(list_samples(demo_root, category, "train"), Preprocess(64))
    model.fit(BatchLoader(train, batch_size=8))
    model.calibrate(BatchLoader(train, batch_size=8))
    batch = Preprocess(64)(read_image(image))[None]
    amaps, scores = model.score(batch)
    heat = heat_overlay(denormalize(batch[0]), amaps[0], 0.0, 1.5 * model.threshold)
    normalized = float(normalized_score(scores[0], model.score_min, model.threshold))
    return model.threshold, float(scores[0]), normalized, heat


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("browser test skipped: Chromium and chromedriver not found "
                    "(apt-get install chromium chromium-driver; .ci/run does this where apt works)")
    pytest.importorskip("gradio", reason="browser test skipped: gradio missing (requirements-app.txt)")
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="browser test skipped: selenium missing (requirements-app.txt)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def app_root(tmp_path_factory) -> Path:
    """Demo data with 16 training images per category (64 px): enough for a readable heat map."""
    return generate(tmp_path_factory.mktemp("app") / "demo", n_train=16, n_test_good=2,
                    n_test_defect=2, size=64, seed=0)


def test_app_in_chromium(browser, app_root, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(tmp_path)}
    command = [sys.executable, "-m", "app", "--port", str(port), "--data_path", str(app_root),
               "--pretrained", "none", "--image_size", "64"]
    log = open(tmp_path / "app.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_http(url, proc, 240)
        browser.get(url)
        wait = WebDriverWait(browser, 180)

        def text_of(elem_id: str) -> str:
            return browser.find_element(By.ID, elem_id).text

        wait.until(lambda d: d.find_elements(By.ID, "load"))
        browser.find_element(By.ID, "load").click()
        wait.until(lambda d: "spot/" in text_of("picked") or "scratch/" in text_of("picked")
                   or d.find_element(By.CSS_SELECTOR, "#picked input").get_attribute("value"))
        browser.find_element(By.CSS_SELECTOR, "#category input").click()  # choose "tiles"
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#category li[aria-label='tiles']"))[0].click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#picked input").get_attribute("value")
                   .startswith("spot/"))
        k_field = browser.find_element(By.CSS_SELECTOR, "#k input")
        k_field.clear()
        k_field.send_keys(str(K))
        browser.find_element(By.ID, "fit").click()
        wait.until(lambda d: "Fitted" in text_of("status"))
        picked = browser.find_element(By.CSS_SELECTOR, "#picked input").get_attribute("value")
        assert picked.startswith("spot/"), picked  # the last test image: a defective one
        browser.find_element(By.ID, "score").click()
        wait.until(lambda d: "score=" in text_of("result"))
        wait.until(lambda d: d.execute_script(
            "const i = document.querySelector('#heatmap img'); return i && i.complete && i.naturalWidth > 0"))
        result = text_of("result")

        category = browser.find_element(By.CSS_SELECTOR, "#category input").get_attribute("value")
        assert category == "tiles"
        image = app_root / category / "test" / picked
        threshold, score, normalized, heat = _reference(app_root, category, image)
        shown = float(re.search(r"score=([0-9.]+)", result).group(1))
        shown_normalized = float(re.search(r"normalized=([0-9.]+)", result).group(1))
        assert shown == pytest.approx(score, rel=1e-3, abs=1e-4)
        assert shown_normalized == pytest.approx(normalized, abs=2e-3)
        assert f"{threshold:.4f}" in text_of("status")
        assert ("ANOMALOUS" in result) == (score > threshold)
        src = browser.find_element(By.CSS_SELECTOR, "#heatmap img").get_attribute("src")
        with urllib.request.urlopen(src, timeout=10) as response:
            displayed = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))
        heat = np.repeat(np.repeat(heat, 4, axis=0), 4, axis=1)  # the page shows 64 px enlarged x4
        assert displayed.shape == heat.shape
        assert np.abs(displayed.astype(int) - heat.astype(int)).max() <= 2

        screenshot = screenshot_dir(tmp_path) / "app.png"
        browser.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000

        browser.find_element(By.ID, "export").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#download a[href]"))
        href = browser.find_element(By.CSS_SELECTOR, "#download a[href]").get_attribute("href")
        with urllib.request.urlopen(href, timeout=30) as response:
            archive = zipfile.ZipFile(io.BytesIO(response.read()))
        manifest_name = next(n for n in archive.namelist() if n.endswith("deploy.json"))
        manifest = json.loads(archive.read(manifest_name))
        assert manifest["threshold"] == pytest.approx(threshold, rel=1e-6)
        assert manifest["score_min"] is not None and manifest["score_min"] < threshold
        assert {"model.json", "model.pdiparams"} <= {Path(n).name for n in archive.namelist()}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        print((tmp_path / "app.log").read_text()[-3000:])


def test_screenshots_stay_out_of_the_source_tree(tmp_path, monkeypatch):
    monkeypatch.delenv("ORTHOAD_SCREENSHOTS", raising=False)
    assert screenshot_dir(tmp_path) == tmp_path
    monkeypatch.setenv("ORTHOAD_SCREENSHOTS", "0")
    assert screenshot_dir(tmp_path) == tmp_path
    monkeypatch.setenv("ORTHOAD_SCREENSHOTS", "1")
    assert screenshot_dir(tmp_path) == ROOT / "docs" / "screenshots"


def test_fit_runs_a_trained_method_like_train_py_and_reports_its_progress(toy_registered, demo_root):
    """The toy trained method (tests/toy_method.py) through the app's fit: every epoch, in the
    workflow's order (the same losses as engine.workflow.fit_category, train.py's path), progress
    over all epochs with the epoch and the last loss in its note."""
    from engine.workflow import DataPlan, FitPlan, fit_category

    toolkit = pytest.importorskip("app.toolkit")
    options = {"epochs": 2, "lr": 0.01}
    settings = toolkit.FitSettings(method="toyae", image_size=64, pretrained="none", batch_size=4,
                                   options=options)
    calls = []
    model = toolkit.fit(toolkit.train_samples(demo_root, "tiles"), settings,
                        lambda *call: calls.append(call), category="tiles")
    assert [(done, total) for done, total, _ in calls] == [(0, 16), (4, 16), (8, 16), (12, 16), (16, 16)]
    assert calls[0][2] == ""
    assert calls[1][2] == f"epoch 1, loss {model.losses[0]:.4g}"
    assert calls[4][2] == f"epoch 2, loss {model.losses[3]:.4g}"
    assert len(model.losses) == 4 and model.fitted and model.threshold is not None

    config = model_config("toyae", image_size=64, resize=64, pretrained="none", **options)
    plan = FitPlan(DataPlan(demo_root, Preprocess(64), batch_size=4, num_workers=0), config)
    reference = fit_category(plan, "tiles", Runtime(engine="dynamic"))
    np.testing.assert_allclose(model.losses, reference.losses, rtol=1e-6)
    assert model.threshold == pytest.approx(reference.threshold, rel=1e-5)


def test_fit_stops_when_a_step_budget_is_spent(toy_registered, demo_root):
    """--steps 3 with 2 steps per epoch (8 images, batches of 4): one epoch and one step, 12 images."""
    toolkit = pytest.importorskip("app.toolkit")
    settings = toolkit.FitSettings(method="toyae", image_size=64, pretrained="none", batch_size=4,
                                   options={"steps": 3})
    calls = []

    def progress(done: int, total: int, note: str) -> None:
        calls.append((done, total))
        if len(calls) > 10:
            raise AssertionError(f"the fit went on past its step budget: {calls}")

    model = toolkit.fit(toolkit.train_samples(demo_root, "tiles"), settings, progress, category="tiles")
    assert calls == [(0, 12), (4, 12), (8, 12), (12, 12)]
    assert len(model.losses) == 3 and model.n_train == 12 and model.fitted
