"""The QC pages in a real headless Chromium, opened from file:// as a user would.

Builds a real output folder (``run.py`` on a copy of the example dataset with the demo model),
adds a subject whose file names and metadata carry script-injection probes, writes the pages, and
drives the dataset report with the keyboard: selection, ratings, reload, exports, import.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package (nothing is
downloaded): the test fails, it does not skip, when they are missing. Screenshots go to
``/tmp/qc_screens`` (or ``$QC_SCREENS``).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from conftest import DEMO_MODEL, EXAMPLE, run_app
from episeg_bids import qc

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENS = Path(os.environ.get("QC_SCREENS", "/tmp/qc_screens"))
HOSTILE_LABEL = "xss<img src=x onerror=window.__xss=1>"
HOSTILE_TASK = "<script>window.__xss=2</script>"
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1500,950")

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
except ImportError:  # reported by the fixture as a failure with the install line
    webdriver = None


def add_hostile_subject(out: Path) -> str:
    """Copy sub-errsm30's outputs to a subject whose label is an HTML injection, with a hostile
    TaskName and notes; returns the mask path relative to ``out``."""
    source, target = out / "sub-errsm30", out / f"sub-{HOSTILE_LABEL}"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("figures", "log"))
    for path in sorted(target.rglob("*sub-errsm30*")):
        path.rename(path.with_name(path.name.replace("sub-errsm30", f"sub-{HOSTILE_LABEL}")))
    func = target / "ses-01" / "func"
    (mask_json,) = func.glob("*_mask.json")
    meta = json.loads(mask_json.read_text().replace("sub-errsm30", f"sub-{HOSTILE_LABEL}"))
    meta["Notes"] = [HOSTILE_TASK, "<img src=x onerror=window.__xss=3>"]
    meta["Input"]["TaskName"] = HOSTILE_TASK
    mask_json.write_text(json.dumps(meta))
    return mask_json.with_name(mask_json.name.replace(".json", ".nii.gz")).relative_to(out).as_posix()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A participant-level output folder of the example dataset, plus the hostile subject, with
    every subject page and the dataset report written."""
    root = tmp_path_factory.mktemp("qc_browser")
    bids, out = root / "bids", root / "out"
    shutil.copytree(EXAMPLE, bids, ignore=shutil.ignore_patterns("derivatives"))
    done = run_app(bids, out, "participant", "--model-dir", DEMO_MODEL, "-w", root / "work",
                   "--skip-bids-validation")
    assert done.returncode == 0, done.stderr[-3000:]
    hostile_mask = add_hostile_subject(out)
    for subject in sorted(p.name for p in out.glob("sub-*") if p.is_dir()):
        qc.write_subject_page(out, subject)
    qc.write_dataset_report(out, extra={hostile_mask: {
        "columns": {"z_volume_mm3": 0.5}, "flags": [{"code": "outlier_volume_mm3", "message": HOSTILE_TASK}]}})
    return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium with a fresh profile and a downloads folder (``browser.downloads``)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: the QC browser test needs Debian's Chromium "
                    "(apt-get install -y chromium chromium-driver)")
    if webdriver is None:
        pytest.fail("selenium is not installed: pip install selenium -c constraints.txt")
    root = tmp_path_factory.mktemp("chromium")
    downloads = root / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={root / 'profile'}")
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def severe(driver) -> list[str]:
    """Console messages of level SEVERE since the last call (errors, CSP violations, 404s)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def press(driver, *keys: str) -> None:
    for key in keys:
        ActionChains(driver).send_keys(key).perform()


def selected(driver) -> int:
    return int(driver.execute_script(
        "return document.querySelector('#runs tbody tr[aria-selected=\"true\"]').dataset.index"))


def cells(driver, index: int) -> list[str]:
    row = driver.find_element(By.CSS_SELECTOR, f'#runs tbody tr[data-index="{index}"]')
    return [td.get_attribute("textContent") for td in row.find_elements(By.TAG_NAME, "td")]


def header(driver) -> list[str]:
    return [th.get_attribute("textContent") for th in driver.find_elements(By.CSS_SELECTOR, "#runs thead th")]


def wait_until(condition, timeout: float = 5.0) -> bool:
    """Poll ``condition`` until it is true or ``timeout`` seconds have passed; its last value."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(condition())


def wait_for_file(folder: Path, name: str, timeout: float = 10.0) -> Path:
    path = folder / name
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and not list(folder.glob("*.crdownload")):
            return path
        time.sleep(0.1)
    raise AssertionError(f"{name} was not downloaded to {folder} (found {sorted(p.name for p in folder.iterdir())})")


def screenshot(driver, name: str, *, full_page: bool = False) -> None:
    SCREENS.mkdir(parents=True, exist_ok=True)
    if full_page:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1500, min(int(height), 8000))
    driver.save_screenshot(str(SCREENS / name))
    driver.set_window_size(1500, 950)


def test_dataset_report_keyboard_ratings_exports_and_no_script_injection(report, browser):
    driver = browser
    driver.get((report / "qc" / "index.html").as_uri())
    names = header(driver)
    subject, qc_col, rank_col = names.index("Subject"), names.index("QC"), names.index("Rank")
    assert severe(driver) == []
    assert len(driver.find_elements(By.CSS_SELECTOR, "#runs tbody tr")) == 4
    assert [cells(driver, i)[subject] for i in range(4)] == ["brain01", "errsm30", "leipzigR01", HOSTILE_LABEL]

    # keyboard: j/↓ next, k/↑ previous
    assert selected(driver) == 0
    press(driver, "j")
    assert selected(driver) == 1
    press(driver, Keys.ARROW_DOWN)
    assert selected(driver) == 2
    press(driver, "k", Keys.ARROW_UP, Keys.ARROW_UP)
    assert selected(driver) == 0

    # marks: f cycles Pass → Fail → Artifact, digits rank
    press(driver, "j", "f")
    assert "Pass" in cells(driver, 1)[qc_col]
    press(driver, "f", "3")
    assert "Fail" in cells(driver, 1)[qc_col] and cells(driver, 1)[rank_col] == "3"
    press(driver, "j", "f", "f", "f", "7")
    assert "Artifact" in cells(driver, 2)[qc_col] and cells(driver, 2)[rank_col] == "7"

    # overlay: → hides the mask, c switches to the fill
    mosaic = driver.find_element(By.ID, "v-mosaic")
    assert mosaic.get_attribute("src").endswith("_desc-mosaic_mask.svg#contour")
    press(driver, Keys.ARROW_RIGHT)
    assert mosaic.get_attribute("src").endswith("#none")
    press(driver, "c")
    assert mosaic.get_attribute("src").endswith("#fill")
    assert wait_until(lambda: driver.execute_script(
        "const i = document.getElementById('v-mosaic'); return i.complete && i.naturalWidth > 0"))

    # the probes are shown as text and never run
    press(driver, "/")
    ActionChains(driver).send_keys("xss", Keys.ENTER).perform()
    assert selected(driver) == 3
    assert len([r for r in driver.find_elements(By.CSS_SELECTOR, "#runs tbody tr") if r.is_displayed()]) == 1
    status = driver.find_element(By.ID, "v-status").text
    assert f"TaskName “{HOSTILE_TASK}”" in status
    assert HOSTILE_TASK in driver.find_element(By.ID, "v-flags").text
    assert driver.execute_script("return window.__xss") is None
    screenshot(driver, "index_xss.png")
    press(driver, "/")
    ActionChains(driver).key_down(Keys.CONTROL).send_keys("a").key_up(Keys.CONTROL).send_keys(
        Keys.BACKSPACE, Keys.ESCAPE).perform()
    assert len([r for r in driver.find_elements(By.CSS_SELECTOR, "#runs tbody tr") if r.is_displayed()]) == 4
    press(driver, "k", "k")
    assert selected(driver) == 1
    screenshot(driver, "index.png")

    # a reload keeps the marks (same profile) and the selected run (in the URL fragment)
    driver.refresh()
    assert selected(driver) == 1
    assert "Fail" in cells(driver, 1)[qc_col] and cells(driver, 1)[rank_col] == "3"
    assert "Artifact" in cells(driver, 2)[qc_col]

    # exports: TSV, JSON, the fails for manual correction
    for button in ("export-tsv", "export-json", "export-fails"):
        driver.find_element(By.ID, button).click()
    with wait_for_file(driver.downloads, "qc_ratings.tsv").open(newline="") as handle:
        rows = {row["participant_id"]: row for row in csv.DictReader(handle, delimiter="\t")}
    assert (rows["sub-errsm30"]["qc"], rows["sub-errsm30"]["rank"]) == ("fail", "3")
    assert (rows["sub-leipzigR01"]["qc"], rows["sub-leipzigR01"]["rank"]) == ("artifact", "7")
    assert rows["sub-brain01"]["qc"] == "n/a" and f"sub-{HOSTILE_LABEL}" in rows
    exported = json.loads(wait_for_file(driver.downloads, "qc_ratings.json").read_text())
    errsm30_mask = rows["sub-errsm30"]["mask"]
    assert exported["ratings"][errsm30_mask]["qc"] == "fail"
    fails = wait_for_file(driver.downloads, "qc_fails.yml").read_text()
    assert f'MASKS:\n- "{errsm30_mask}"' in fails
    assert 'FILES_SEG:\n- "sub-errsm30_ses-01_task-rest_run-01_bold.nii.gz"' in fails

    # clear a rating (x), then import the JSON export back
    press(driver, "x")
    assert cells(driver, 1)[qc_col] == ""
    driver.find_element(By.ID, "import-json").send_keys(str(driver.downloads / "qc_ratings.json"))
    assert wait_until(lambda: "Fail" in cells(driver, 1)[qc_col])
    assert driver.execute_script("return window.__xss") is None
    assert severe(driver) == []


def test_subject_pages_open_without_errors(report, browser):
    driver = browser
    driver.get((report / "sub-errsm30.html").as_uri())
    assert driver.find_elements(By.CSS_SELECTOR, "section.run img.fig")
    assert wait_until(lambda: driver.execute_script(
        "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"))
    press(driver, "c")
    assert all(i.get_attribute("src").endswith("#fill") for i in driver.find_elements(By.CSS_SELECTOR, "img.overlay"))
    screenshot(driver, "subject.png", full_page=True)
    assert severe(driver) == []
    driver.get((report / f"sub-{HOSTILE_LABEL}.html").as_uri())
    assert HOSTILE_TASK in driver.find_element(By.TAG_NAME, "body").text
    assert driver.execute_script("return window.__xss") is None
    assert severe(driver) == []
