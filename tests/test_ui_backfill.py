"""The Dagster UI in a real browser: the asset graph, a backfill of two départements clicked through, the results.

Starts `dagster dev` from workspace.yaml on 127.0.0.1 (webserver + daemon, SQLite storage in a
temporary DAGSTER_HOME) and drives Debian's Chromium through its ChromeDriver with selenium (both
installed by `make test`): opens the catalog and sees the assets, opens the enrichment job, picks
départements 12 and 2A among the 101 partitions in the backfill dialog and launches it by clicking,
waits for both runs to succeed, then opens `predictions` and sees its map, its example chips and its
passing checks. Screenshots of each step are saved under the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.xdist_group("ui")]

REPO = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = (
    shutil.which("chromium") or "/usr/bin/chromium",
    shutil.which("chromedriver") or "/usr/bin/chromedriver",
)
ASSETS = ["buildings", "ortho_mosaic", "chips", "predictions", "building_attributes", "departement_summary"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = json.loads(resp.read())
    assert "errors" not in body, body
    return body["data"]


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory):
    from synthetic import generate_departement

    root = tmp_path_factory.mktemp("ui")
    for k, dep in enumerate(("12", "2A")):
        generate_departement(root / "sample", dep, 150, seed=k, tile_px=1000)
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "orchestration" / "instance" / "local.yaml", home / "dagster.yaml")
    port = _free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "BATIVISION_DATA_DIR": str(root / "data"),
        "BATIVISION_SOURCE_DIR": str(root / "sample"),
    }
    dagster = Path(sys.executable).parent / "dagster"
    log = open(root / "dagster_dev.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [str(dagster), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                _graphql(port, "{ version }")
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((root / "dagster_dev.log").read_text()[-3000:]) from None
                time.sleep(1)
        yield port, root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


STATUS = """
query {
  partitionBackfillsOrError {
    ... on PartitionBackfills { results { id status } }
  }
  runsOrError {
    ... on Runs { results { runId status tags { key value } } }
  }
}"""


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_a_backfill_of_two_departements_clicked_through_the_ui(dagster_dev, browser, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    port, root = dagster_dev
    base = f"http://127.0.0.1:{port}"
    wait = WebDriverWait(browser, 90)

    def shot(name: str) -> None:
        browser.save_screenshot(str(tmp_path / f"{name}.png"))

    def button(text: str):
        return wait.until(ec.element_to_be_clickable((By.XPATH, f"//button[normalize-space()='{text}']")))

    def skip_welcome() -> None:
        """The first visit greets with a newsletter dialog, shortly after the page loads: skip it once."""
        try:
            WebDriverWait(browser, 15).until(
                ec.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Skip']"))
            ).click()
        except TimeoutException:
            return

    # the catalog: every asset of the code location
    browser.get(base + "/assets")
    wait.until(ec.presence_of_element_located((By.XPATH, "//*[normalize-space()='predictions']")))
    skip_welcome()
    for name in ("footprint_files", "orthophoto_tiles", *ASSETS, "roof_model", "solar_model"):
        assert browser.find_elements(By.XPATH, f"//*[normalize-space()='{name}']"), name
    shot("1-catalog")
    # the asset graph
    browser.get(base + "/asset-groups")
    wait.until(ec.presence_of_element_located((By.XPATH, "//*[normalize-space()='inputs']")))
    shot("2-asset-graph")
    # the enrichment job: Materialize all → the backfill dialog, 12 and 2A picked among the 101
    browser.get(base + "/locations/bativision/jobs/enrich_departement")
    button("Materialize all…").click()
    # first a warning that the model assets were never materialized here (the shipped models serve), then the dialog
    confirm = "//button[normalize-space()='Confirm']"
    picker = "//*[contains(text(), 'Select a partition')]"
    wait.until(lambda b: b.find_elements(By.XPATH, confirm) or b.find_elements(By.XPATH, picker))
    for b in browser.find_elements(By.XPATH, confirm):
        b.click()
    # a click while the confirmation closes can land before the picker listens (seen once under a loaded
    # xdist run: the list never opened), and once the 101 partitions showed without their filter ever
    # becoming usable: click again until both are there
    opened = ec.all_of(
        ec.presence_of_element_located((By.XPATH, "//*[normalize-space()='Select all (101)']")),
        ec.element_to_be_clickable((By.XPATH, "//input[@placeholder='Filter partitions']")),
    )
    for attempt in range(4):
        wait.until(ec.element_to_be_clickable((By.XPATH, picker))).click()
        try:
            search = WebDriverWait(browser, 30).until(opened)[1]
            break
        except TimeoutException:
            shot(f"picker-not-open-{attempt}")
    else:
        raise AssertionError("the backfill dialog's partition picker did not open with its filter after 4 clicks")

    def pick(dep: str) -> None:
        """Filter the list down to ``dep`` and tick it, once the list has settled on the filter.

        Why not ``clear()`` then click at once: ``clear()`` does not reach React's state (the
        next key would append to the old filter), and a click while the list re-renders lands on
        a label that is being replaced (stale) or on the row that the new list puts there.
        """
        label = f"//label[.//*[normalize-space()='{dep}']]"
        search.send_keys(Keys.CONTROL, "a")
        search.send_keys(Keys.BACKSPACE)
        search.send_keys(dep)

        def settled(b):  # the filter applied: our label shown, the unfiltered list's first entry gone
            if search.get_attribute("value") != dep or b.find_elements(
                By.XPATH, "//label[.//*[normalize-space()='01']]"
            ):
                return False
            return b.find_elements(By.XPATH, label)

        for _ in range(5):
            try:
                wait.until(settled)[0].click()
                return
            except StaleElementReferenceException:
                time.sleep(0.5)
        raise AssertionError(f"the backfill dialog's partition {dep} could not be ticked")

    for dep in ("12", "2A"):
        pick(dep)
    search.send_keys(Keys.ESCAPE)
    wait.until(ec.presence_of_element_located((By.XPATH, "//*[normalize-space()='2 partitions']")))
    shot("3-backfill-dialog")
    button("Launch backfill").click()
    # both runs succeed (read through the webserver's API the UI uses)
    deadline = time.monotonic() + 900
    while True:
        data = _graphql(port, STATUS)
        backfills = data["partitionBackfillsOrError"]["results"]
        runs = data["runsOrError"]["results"]
        if backfills and backfills[0]["status"] in (
            "COMPLETED",
            "COMPLETED_SUCCESS",
            "FAILED",
            "COMPLETED_FAILED",
            "CANCELED",
        ):
            break
        assert time.monotonic() < deadline, (backfills, runs, (root / "dagster_dev.log").read_text()[-3000:])
        time.sleep(3)
    assert len(backfills) == 1 and backfills[0]["status"] in ("COMPLETED", "COMPLETED_SUCCESS"), (backfills, runs)
    partitions = sorted(t["value"] for r in runs for t in r["tags"] if t["key"] == "dagster/partition")
    assert partitions == ["12", "2A"] and {r["status"] for r in runs} == {"SUCCESS"}, runs
    browser.get(base + "/runs")
    wait.until(ec.presence_of_element_located((By.XPATH, "//*[normalize-space()='Success']")))
    shot("4-runs")
    # predictions: the map and example chips in its metadata, its checks passed
    browser.get(base + "/assets/predictions")
    wait.until(ec.presence_of_element_located((By.XPATH, "//*[normalize-space()='roof_type_map']")))
    for key in ("roof_type_map", "solar_panels_map", "roof_type_examples", "solar_panels_examples"):
        assert browser.find_elements(By.XPATH, f"//*[normalize-space()='{key}']"), key
    shot("5-predictions")
    for n, key in enumerate(("solar_panels_map", "roof_type_examples")):  # markdown values open in a dialog
        row = f"//tr[.//*[normalize-space()='{key}']]"
        wait.until(ec.element_to_be_clickable((By.XPATH, f"{row}//a[normalize-space()='[Show Markdown]']"))).click()
        wait.until(ec.visibility_of_element_located((By.XPATH, "//img[starts-with(@src, 'data:image/png')]")))
        shot(f"5{'ab'[n]}-{key}")
        button("Close").click()
        wait.until(ec.invisibility_of_element_located((By.XPATH, "//img[starts-with(@src, 'data:image/png')]")))
    browser.get(base + "/assets/predictions?view=checks")
    wait.until(ec.presence_of_element_located((By.XPATH, "//*[normalize-space()='account_for_every_building']")))
    assert len(browser.find_elements(By.XPATH, "//*[normalize-space()='Succeeded']")) >= 2
    shot("6-predictions-checks")
    for dep in ("12", "2A"):
        assert list((root / "data" / "store" / "chips" / dep).glob("*.index.parquet")), dep
