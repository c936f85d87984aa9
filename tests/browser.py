"""Headless Chromium (Debian's /usr/bin/chromium and its chromedriver, no browser download) for the tests that look
at a UI the way users do: Prefect's artifact page, MLflow's run page, TensorBoard's scalars."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")


def skip_outside_ci(why: str) -> None:
    """In CI (CI set) a missing prerequisite is a failure: a check that silently did not run is not a pass."""
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI is set, so this fails instead of skipping)")
    pytest.skip(why)


@contextmanager
def chromium(screenshot: Path):
    """A headless Chromium driver; its last page is saved to `screenshot` when the block ends, passed or failed."""
    if not CHROMIUM.exists():
        skip_outside_ci("Debian's chromium is not installed (.ci/setup installs it when run as root)")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium must not try to fetch a driver
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1100", "--disable-dev-shm-usage"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"))
    try:
        yield driver
    finally:
        driver.save_screenshot(str(screenshot))
        driver.quit()
        print(f"\nscreenshot: {screenshot}")


def page_shows(*texts: str):
    """A WebDriverWait condition: the page's visible text contains every one of `texts` (returns that text)."""
    from selenium.webdriver.common.by import By

    def check(driver):
        # TensorBoard sets a tag's group and its rest in separate elements ("eval", "/loss"): one line again
        body = driver.find_element(By.TAG_NAME, "body").text.replace("\n/", "/")
        return body if all(t in body for t in texts) else False

    return check
