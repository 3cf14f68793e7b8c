"""Headless Chromium for the browser tests (Debian's chromium and chromium-driver).

Import this only after ``pytest.importorskip("selenium")``: it imports selenium.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: This machine is slow and loaded: the MLflow UI's first paint takes 5-25 s.
WAIT_S = 90
PNG_MIN_BYTES = 20_000  # a blank 1600x1000 page is a few KB; MLflow's pages are 70-170 KB

T = TypeVar("T")
#: React re-renders replace elements under a waiting condition: poll again.
IGNORED = (NoSuchElementException, StaleElementReferenceException)


def require_chromium() -> None:
    """Skip (a whole module where called at import), naming what is missing and how
    to get it, where Chromium cannot run."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not installed: run `make browser-deps` as root "
            "(Debian's chromium and chromium-driver)",
            allow_module_level=True,
        )


def artifacts_dir() -> Path:
    """Where screenshots go: $TUNE_ALR_TEST_ARTIFACTS, else <repo>/test-artifacts/browser."""
    folder = os.environ.get("TUNE_ALR_TEST_ARTIFACTS")
    path = (
        Path(folder) if folder else Path(__file__).resolve().parents[1] / "test-artifacts/browser"
    )
    path.mkdir(parents=True, exist_ok=True)
    return path


def chrome(profile: Path, width: int = 1600, height: int = 1000) -> WebDriver:
    """A headless Chromium with a fresh profile (empty localStorage, as a first visit)."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
    ):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(120)
    return driver


def quit_chrome(driver: WebDriver, profile: Path) -> None:
    try:
        driver.quit()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver: WebDriver, path: Path) -> Path:
    """Save a PNG of the window (replacing an older one) and check it is a real picture."""
    path.unlink(missing_ok=True)
    driver.save_screenshot(str(path))
    check_png(path)
    return path


def check_png(path: Path) -> None:
    assert path.is_file(), f"no screenshot at {path}"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert len(data) >= PNG_MIN_BYTES, f"{path} is {len(data)} bytes: a blank page?"


def seen(driver: WebDriver, chars: int = 600) -> str:
    """What the page shows now, for assertion messages: its URL, title and text."""
    try:
        title = driver.execute_script(
            "const h = document.querySelector('h2'); return h ? h.innerText : null"
        )
        text = driver.execute_script("return document.body ? document.body.innerText : ''")
    except WebDriverException as err:
        return f"url {driver.current_url} (page unreadable: {err.msg})"
    text = " | ".join(line.strip() for line in str(text).splitlines() if line.strip())
    return f"url {driver.current_url}, heading {title!r}, text: {text[:chars]}"


def wait_for(
    driver: WebDriver,
    condition: Callable[[WebDriver], T],
    what: str,
    shot: Path | None = None,
    timeout: float = WAIT_S,
) -> T:
    """Wait for ``condition`` (a WebDriverWait condition); on timeout keep a screenshot
    and fail saying what was awaited and what the page showed instead."""
    try:
        wait = WebDriverWait(driver, timeout, poll_frequency=0.5, ignored_exceptions=IGNORED)
        return wait.until(condition)
    except TimeoutException:
        if shot is not None:
            driver.save_screenshot(str(shot))
        where = f" (screenshot {shot})" if shot is not None else ""
        raise AssertionError(
            f"waited {timeout:.0f} s for {what}; saw {seen(driver)}{where}"
        ) from None
