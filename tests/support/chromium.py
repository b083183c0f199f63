"""What the browser tests share: finding Debian's chromium and chromedriver (or skipping with what is missing and
how to install it) and starting a headless Chromium through selenium."""
import importlib.util
import os
import shutil

import pytest


def browser_paths(*modules: str) -> tuple[str, str]:
    """(chromium, chromedriver), or a skip naming what is missing: selenium and ``modules`` (Python packages),
    the browser, the driver."""
    missing = [f"the {m} package (pip install {m})" for m in ("selenium", *modules)
               if importlib.util.find_spec(m) is None]
    chromium = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                                 shutil.which("google-chrome"), "/usr/bin/chromium") if p and os.path.isfile(p)), None)
    driver = next((p for p in (shutil.which("chromedriver"), "/usr/bin/chromedriver") if p and os.path.isfile(p)),
                  None)
    if chromium is None:
        missing.append("a Chromium browser (Debian: apt-get install chromium)")
    if driver is None:
        missing.append("chromedriver (Debian: apt-get install chromium-driver)")
    if missing:
        pytest.skip("browser test skipped: needs " + ", ".join(missing))
    return chromium, driver


def start_chromium(flags, *modules: str):
    """A headless Chromium driven by selenium (skips when it cannot start)."""
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = browser_paths(*modules)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in flags:
        options.add_argument(flag)
    try:
        return webdriver.Chrome(service=Service(driver_path), options=options)
    except WebDriverException as exc:
        pytest.skip(f"browser test skipped: Chromium did not start headless ({exc.msg or exc})")
