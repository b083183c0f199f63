"""report.html in a real browser: headless Chromium opens the page of a tiny built-in evaluation from disk and
checks its tables, that every image decodes, that a click on a column header sorts the rows, that the page reads
without JavaScript and fetches nothing; then the page of a class folder's evaluation (one protocol, its classes,
a query link whose target holds the folder's path). It saves screenshots (the pytest tmp dir, copied to /tmp).

Needs Chromium, its driver and Selenium (Debian: ``apt-get install chromium chromium-driver``;
``pip install selenium``); the test skips, saying so, where they are missing.
"""
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.support.chromium import browser_paths, start_chromium

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = Path(os.environ.get("REPORT_SCREENSHOT_DIR", "/tmp"))
# 4 training images: the built-in config's whitening rows learn on them
TINY_SYNTH = ("data.synthetic.config={n_landmarks: 3, views_per_landmark: 3, n_distractors: 3, "
              "image_size: [96, 64], train_landmarks: 2, train_views_per_landmark: 2}")
HEADLESS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    browser_paths()  # skip before spending the evaluation's seconds
    spec = importlib.util.spec_from_file_location("eval_script", REPO / "eval.py")
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    tmp = tmp_path_factory.mktemp("report")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = [f"data.root={tmp / 'data'}", f"output_dir={tmp / 'runs'}", "extraction.cache_dir=null",
                "model.builtin_checkpoints.rerank=null", "model.builtin_checkpoints.backbone=null", "progress=false",
                "name=run", "viz.num_queries=0", TINY_SYNTH]
        assert ev.main(ev.get_args_parser().parse_args(argv)) == 0
    finally:
        torch.set_num_threads(threads)
    return tmp / "runs" / "run"


@pytest.fixture(scope="module")
def browser():
    driver = start_chromium(HEADLESS)
    yield driver
    driver.quit()


def _column(driver, table_id: str, col: int) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.getElementById(arguments[0]).tBodies[0].rows)"
        ".map(r => r.cells[arguments[1]].dataset.v);", table_id, col)


def _header(driver, table_id: str, text: str):
    from selenium.webdriver.common.by import By

    heads = driver.find_element(By.ID, table_id).find_elements(By.CSS_SELECTOR, "thead th")
    return next(h for h in heads if h.text.replace("\u21c5", "").strip().startswith(text))


@pytest.mark.slow
def test_report_page_in_chromium(run_dir, browser, tmp_path):
    from selenium.webdriver.common.by import By

    res = json.loads((run_dir / "results.json").read_text())
    pq = res["per_query"]["datasets"]["synth"]
    nq, methods, top = len(pq["queries"]), res["methods"], res["per_query"]["top"]
    browser.get((run_dir / "report.html").as_uri())
    assert browser.title == "Evaluation report run"

    # the summary tables: the papers' layout and the full one, a row per method
    summaries = browser.find_elements(By.CSS_SELECTOR, "table.summary")
    assert len(summaries) == 2
    for table in summaries:
        assert len(table.find_elements(By.CSS_SELECTOR, "tbody tr")) == len(methods)
    # a per-query table per row, a row per query, with AP changes for the re-rankings and post-processed rows
    assert len(methods) == 4 + 2 * 6  # the built-in config's post rows: 6 per global ranking
    for method in methods:
        table = browser.find_element(By.ID, f"t-synth-{method}")
        assert len(table.find_elements(By.CSS_SELECTOR, "tbody tr")) == nq
        heads = [h.text for h in table.find_elements(By.CSS_SELECTOR, "thead th")]
        assert any("\u0394AP Medium" in h for h in heads) == (method.endswith("_rerank") or "+" in method)
    # every image decoded: query crops in the tables and the cards, top results of 4 rankings per query
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);")
    assert len(images) == len(methods) * nq + nq * (1 + len(methods) * top)
    assert all(done and w > 0 and h > 0 for done, w, h in images)
    assert len(browser.find_elements(By.CSS_SELECTOR, "li.tile")) == nq * len(methods) * top
    # nothing fetched from anywhere: the images are data URIs, the curves inline SVG
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    assert all(name.startswith("data:") for name in fetched), fetched
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.pr polyline")) == 3 * len(methods)

    # sorting: by AP change (largest gain first, n/a last), then by query number, then reversed
    table_id = "t-synth-cvnet_rerank"
    delta_col = 6  # #, query, AP E/M/H, dAP E, dAP M
    _header(browser, table_id, "\u0394AP Medium").click()
    values = [float(v) for v in _column(browser, table_id, delta_col) if v]
    assert values == sorted(values, reverse=True)
    assert all(v for v in _column(browser, table_id, delta_col)[: len(values)])  # n/a rows last
    number = _header(browser, table_id, "#")
    number.click()
    assert [int(v) for v in _column(browser, table_id, 0)] == list(range(nq))
    assert number.get_attribute("aria-sort") == "ascending"
    number.click()
    assert [int(v) for v in _column(browser, table_id, 0)] == list(reversed(range(nq)))
    assert number.get_attribute("aria-sort") == "descending"

    shots = []
    browser.execute_script("window.scrollTo(0, 0);")
    shots.append(tmp_path / "report_screenshot.png")
    assert browser.save_screenshot(str(shots[-1]))
    browser.execute_script("document.getElementById('q-synth-0').scrollIntoView();")
    shots.append(tmp_path / "report_screenshot_query.png")
    assert browser.save_screenshot(str(shots[-1]))

    # without JavaScript: the same tables in query order, every image, no sorting hint
    browser.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": True})
    try:
        browser.get((run_dir / "report.html").as_uri())
        table = browser.find_element(By.ID, table_id)
        rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
        assert [r.find_element(By.CSS_SELECTOR, "td").text for r in rows] == [str(i) for i in range(nq)]
        assert not browser.find_element(By.CSS_SELECTOR, ".sorthint").is_displayed()
        assert len(browser.find_elements(By.CSS_SELECTOR, "img")) == len(images)
    finally:
        browser.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": False})

    for shot in shots:
        assert shot.stat().st_size > 10_000
        try:
            shutil.copy(shot, SCREENSHOTS / shot.name)
        except OSError:  # a read-only /tmp must not fail the test; the pytest tmp dir keeps the screenshot
            pass


@pytest.fixture(scope="module")
def folder_run_dir(tmp_path_factory):
    """An evaluation of a class folder (the built-in landmarks written as one): its report has one protocol."""
    browser_paths()
    from datasets.synthetic import SyntheticConfig
    from datasets.synthetic.class_folder import write_class_folder

    spec = importlib.util.spec_from_file_location("eval_script", REPO / "eval.py")
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    tmp = tmp_path_factory.mktemp("folder_report")
    config = SyntheticConfig(n_landmarks=3, views_per_landmark=3, n_distractors=3, image_size=(96, 64),
                             train_landmarks=2, train_views_per_landmark=2)
    test = write_class_folder(tmp / "classes", root=tmp / "data", config=config) / "test"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = [f"data.root={tmp / 'data'}", f"output_dir={tmp / 'runs'}", "extraction.cache_dir=null",
                "model.builtin_checkpoints.rerank=null", "model.builtin_checkpoints.backbone=null", "progress=false",
                "name=run", "viz.num_queries=0", f"data.datasets=[folder:{test}]",
                "methods=[superglobal, superglobal_rerank]", "post.rows=[aqe]"]
        assert ev.main(ev.get_args_parser().parse_args(argv)) == 0
    finally:
        torch.set_num_threads(threads)
    return tmp / "runs" / "run", f"folder:{test}"


@pytest.mark.slow
def test_class_folder_report_page_in_chromium(folder_run_dir, browser, tmp_path):
    """A class folder's page: one precision-recall panel, a class column, AP without E/M/H, sorting, and a query's
    link (its id holds the folder's path) that lands on its card."""
    from selenium.webdriver.common.by import By

    run_dir, label = folder_run_dir
    anchor = re.sub(r"[^\w.+-]", "-", label)  # the label in ids: the folder's path without its separators
    assert anchor.startswith("folder--") and anchor.endswith("-classes-test")
    res = json.loads((run_dir / "results.json").read_text())
    pq = res["per_query"]["datasets"][label]
    nq, methods, top = len(pq["queries"]), res["methods"], res["per_query"]["top"]
    browser.get((run_dir / "report.html").as_uri())
    summaries = browser.find_elements(By.CSS_SELECTOR, "table.summary")
    assert [len(t.find_elements(By.CSS_SELECTOR, "tbody tr")) for t in summaries] == [len(methods)] * 2
    heads = [h.text for h in summaries[1].find_elements(By.CSS_SELECTOR, "thead th")]
    assert heads == ["Method", "mAP", "R@1", "R@5", "R@10", "mP@1", "mP@5", "mP@10"]
    for method in methods:
        table = browser.find_element(By.ID, f"t-{anchor}-{method}")
        heads = [h.text.replace("\u21c5", "").strip() for h in table.find_elements(By.CSS_SELECTOR, "thead th")]
        assert heads[:4] == ["#", "query", "class", "AP"] and not any("Medium" in h or "Easy" in h for h in heads)
        classes = [c.text for c in table.find_elements(By.CSS_SELECTOR, "td.cls")]
        assert classes == pq["query_classes"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.pr polyline")) == len(methods)  # one panel
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);")
    assert all(done and w > 0 and h > 0 for done, w, h in images)
    assert len(browser.find_elements(By.CSS_SELECTOR, "li.tile")) == nq * len(methods) * top

    table_id = f"t-{anchor}-superglobal_rerank"
    _header(browser, table_id, "\u0394AP").click()
    values = [float(v) for v in _column(browser, table_id, 4) if v]
    assert values == sorted(values, reverse=True)
    shots = [tmp_path / "report_folder_screenshot.png"]
    browser.execute_script("window.scrollTo(0, 0);")
    assert browser.save_screenshot(str(shots[-1]))
    link = browser.find_element(By.ID, table_id).find_element(By.CSS_SELECTOR, "td.q a")
    target = link.get_attribute("href").split("#", 1)[1]
    link.click()
    assert browser.execute_script("return document.querySelector(':target').id;") == target
    shots.append(tmp_path / "report_folder_screenshot_query.png")
    assert browser.save_screenshot(str(shots[-1]))
    for shot in shots:
        assert shot.stat().st_size > 10_000
        try:
            shutil.copy(shot, SCREENSHOTS / shot.name)
        except OSError:
            pass
