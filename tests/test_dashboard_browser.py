"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver, Selenium).

The live parts are what only a browser can show: the running part appearing
on the overview and the event feed gaining rows while a real daemon runs a
slow selftest part, without a reload; the enqueue form's findings; a write
refused off loopback. Screenshots of the main pages go to $FORGE_SCREENSHOTS
(else the test's tmp dir). Skipped only when chromium or chromedriver is not
installed (bootstrap/browser-tools.sh installs them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.dashkit import TOKEN, rework_part, serving
from tests.linekit import factory, make_root, selftest_alloy, start_daemon, stop, wait_for, where, write_alloy

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                reason=f"{CHROMIUM} or {CHROMEDRIVER} is not installed: run bootstrap/browser-tools.sh")
# This machine's closed network refuses Chromium's own background connections; these flags stop them.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1600")


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with the driver's path given too, Selenium Manager is never run
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def shots(tmp_path) -> Path:
    out = Path(os.environ.get("FORGE_SCREENSHOTS") or tmp_path / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _shot(driver, shots: Path, name: str) -> None:
    path = shots / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


def _css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def test_overview_shows_the_running_part_and_the_feed_grows(tmp_path, browser, shots):
    root = make_root(tmp_path / "root")
    with serving(root) as srv:
        browser.get(srv.url + "/")
        before = len(_css(browser, "#feed tbody tr.event"))  # a fresh root: no events yet
        daemon = start_daemon(root)
        try:
            write_alloy(tmp_path / "slow.alloy.json", selftest_alloy(stages=2, seconds=4.0, steps=8))
            factory("enqueue", str(tmp_path / "slow.alloy.json"), root=root, check=True)
            row = wait_for(lambda: [r for r in _css(browser, "#running tr.running-part") if "slow" in r.text],
                           timeout=60, what="the running part on the overview (no reload)")
            assert "selftest" in row[0].text
            # the station counts refresh with it: assembly holds the running part (no reload)
            counts = [c.text for c in _css(browser, "#running td.station-count")]
            assert counts[1] == "1", counts
            wait_for(lambda: _css(browser, "#running progress"), timeout=30, what="a progress bar")
            wait_for(lambda: len(_css(browser, "#feed tbody tr.event")) > before, timeout=30, what="new feed rows")
            _shot(browser, shots, "overview")
            wait_for(lambda: any("part/finished" in r.text for r in _css(browser, "#feed tbody tr.event")),
                     timeout=60, what="part/finished in the feed")
        finally:
            stop(daemon)
        browser.get(srv.url + "/parts/slow")
        assert len(_css(browser, "svg.plot")) >= 2
        _shot(browser, shots, "part")


def test_enqueue_form_shows_findings_then_enqueues(tmp_path, browser, shots):
    from selenium.webdriver.common.by import By

    root = make_root(tmp_path / "root")
    with serving(root) as srv:
        browser.get(srv.url + "/enqueue")
        browser.find_element(By.NAME, "name").send_keys("bad-alloy")
        browser.find_element(By.NAME, "alloy").send_keys(json.dumps({"name": "x", "stages": "none"}))
        browser.find_element(By.ID, "submit").click()
        wait_for(lambda: _css(browser, "#findings tr.finding"), timeout=30, what="the findings")
        _shot(browser, shots, "enqueue-error")
        assert "bad-alloy" not in where(root)
        name = browser.find_element(By.NAME, "name")
        name.clear()
        name.send_keys("good-alloy")
        area = browser.find_element(By.NAME, "alloy")
        area.clear()
        area.send_keys(json.dumps(selftest_alloy()))
        browser.find_element(By.ID, "submit").click()
        wait_for(lambda: _css(browser, "#enqueued a"), timeout=30, what="the enqueued link")
        assert (root / "line" / "intake" / "good-alloy.alloy.json").is_file()


def test_a_write_without_the_token_is_refused_off_loopback(tmp_path, browser):
    from selenium.webdriver.common.by import By

    root = make_root(tmp_path / "root", extra=f'\n[serve]\ntoken = "{TOKEN}"\n')
    rework_part(root, "failed-part", "it failed")
    with serving(root, host="0.0.0.0") as srv:
        browser.get(srv.url + "/parts/failed-part")
        browser.find_element(By.CSS_SELECTOR, "button[value=retry]").click()
        wait_for(lambda: "write refused" in browser.page_source, timeout=30, what="the refusal page")
        assert "wrong or missing token" in browser.find_element(By.ID, "problem").text
        assert where(root)["failed-part"] == [("rework", 0)]
        browser.get(srv.url + "/parts/failed-part")
        browser.find_element(By.NAME, "token").send_keys(TOKEN)
        browser.find_element(By.CSS_SELECTOR, "button[value=retry]").click()
        wait_for(lambda: where(root)["failed-part"][0][0] == "intake", timeout=30, what="the retry")
