"""The web demo in a real browser: ``demo.py --index <tiny index> --port <free port>`` runs in a subprocess, headless
Chromium (through Selenium) opens it, clicks an example query, searches, and checks that the gallery shows k
captioned results and that the stage timings table appears; a screenshot goes to the pytest tmp dir and is copied
to /tmp/demo_screenshot.png. The server is killed at the end.

Needs Chromium, its driver, Selenium and Gradio (Debian: ``apt-get install chromium chromium-driver``;
``pip install selenium gradio``); the test skips, saying so, where they are missing.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.support.chromium import browser_paths, start_chromium

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = Path(os.environ.get("DEMO_SCREENSHOT", "/tmp/demo_screenshot.png"))
HEADLESS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1300")
K = 4
START_TIMEOUT = 120  # s for the server to listen (importing torch and gradio on a busy 2-core machine)
SEARCH_TIMEOUT = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"demo.py exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"demo.py did not listen on port {port} within {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory) -> Path:
    browser_paths("gradio")
    from helpers.retrieval.commands import build_index

    root = tmp_path_factory.mktemp("demo")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        assert cv2.imwrite(str(root / "images" / f"view{i}.png"),
                           cv2.resize(coarse, (128, 96), interpolation=cv2.INTER_CUBIC))
    build_index(images=root / "images", index_dir=root / "index", scales=[1.0], device="cpu", progress=False)
    return root / "index"


@pytest.fixture(scope="module")
def server(tiny_index, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "demo.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "demo.py"), "--index", str(tiny_index),
                                 "--port", str(port), "--device", "cpu"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, proc, log)
        yield f"http://127.0.0.1:{port}/", log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser(server):
    driver = start_chromium(HEADLESS, "gradio")
    yield driver
    driver.quit()


@pytest.mark.slow
def test_demo_search_shows_k_results_and_timings(server, browser, tiny_index, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    url, log = server
    browser.get(url)
    wait = WebDriverWait(browser, SEARCH_TIMEOUT)
    wait.until(EC.element_to_be_clickable((By.ID, "search")))
    assert "Index" in browser.find_element(By.ID, "header").text
    assert "RANDOM WEIGHTS" in browser.find_element(By.ID, "random-banner").text  # built without --weights

    # k: set the slider's number box; then the query: an example of the index, else the file input
    number = browser.find_element(By.CSS_SELECTOR, "#topk input[type=number]")
    number.clear()
    number.send_keys(str(K), "\t")
    examples = browser.find_elements(By.CSS_SELECTOR, "#examples button, #examples tbody tr")
    if examples:
        examples[0].click()
    else:
        upload = browser.find_element(By.CSS_SELECTOR, "#query input[type=file]")
        upload.send_keys(str(sorted((tiny_index.parent / "images").glob("*.png"))[0]))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#query-preview img"))  # the query arrived
    browser.find_element(By.CSS_SELECTOR, "#rerank input[value=superglobal]").click()
    browser.find_element(By.ID, "search").click()

    def gallery_images(driver):
        imgs = driver.find_elements(By.CSS_SELECTOR, "#results img")
        return imgs if len(imgs) >= K else False

    try:
        images = wait.until(gallery_images)
    except Exception as exc:
        browser.save_screenshot(str(tmp_path / "failed.png"))
        shutil.copyfile(tmp_path / "failed.png", SCREENSHOT)
        tail = log.read_text()[-3000:]
        raise AssertionError(f"no {K} results within {SEARCH_TIMEOUT} s; server log:\n{tail}") from exc
    assert len(images) == K
    assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
               for img in images)
    timings = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#timings table"))[0]
    stages = [row.find_elements(By.TAG_NAME, "td")[0].text for row in timings.find_elements(By.CSS_SELECTOR,
                                                                                            "tbody tr")]
    assert {"describe query", "re-ranking", "total"} <= set(stages), stages
    message = browser.find_element(By.ID, "message").text
    assert f"{K} results" in message and "re-ranking superglobal" in message
    captions = browser.find_element(By.ID, "results").text
    assert "#1" in captions and ".png" in captions, captions  # rank, score, file name under each thumbnail
    browser.execute_script("window.scrollTo(0, 0);")
    shot = tmp_path / "demo.png"
    browser.save_screenshot(str(shot))
    shutil.copyfile(shot, SCREENSHOT)
