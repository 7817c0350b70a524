"""The QC pages in a real headless Chromium, opened from file:// as a user would.

Builds a real output folder (``run.py`` on a copy of the example dataset with the demo model),
then two reports from copies of it:

- participant level, plus a subject whose file names and metadata carry script-injection probes:
  the dataset report driven with the keyboard (selection, ratings, reload, exports, import);
- group level with ``--ground-truth`` (the example's manual mask of sub-leipzigR01), after adding
  to the real Leipzig mask a 20 mm³ component 30 mm from the cord (with the project's writers,
  metrics and flags re-measured as the participant level does), a motion table to the 4D run
  and a confidence score to every run: the far component, both contours, the Dice, the motion
  plot, TaskName of the 3D mean, the confidence column, the table's width at 1400 px.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package (nothing is
downloaded): the test fails, it does not skip, when they are missing. Screenshots go to
``/tmp/qc_screens`` (or ``$QC_SCREENS``).
"""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import DEMO_MODEL, EXAMPLE, run_app
from episeg_bids import derivatives as deriv
from episeg_bids import metrics, qc
from episeg_bids.atomic import write_json_atomic, write_tsv_atomic

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


LEIPZIG_MASK = "sub-leipzigR01/func/sub-leipzigR01_task-rest_rec-MoCoMean_space-orig_label-SC_mask.nii.gz"
ERRSM30_MASK = "sub-errsm30/ses-01/func/sub-errsm30_ses-01_task-rest_run-01_space-orig_label-SC_mask.nii.gz"
BRAIN_MASK = "sub-brain01/func/sub-brain01_task-rest_space-orig_label-SC_mask.nii.gz"
FAR_SLICE = 12


def rewrite_mask(out: Path, mask_rel: str, mask: np.ndarray) -> dict:
    """Replace a run's mask (same header geometry) and re-measure its metrics and flags as the
    participant level does, with the project's writers; its figures are left to the report to
    redraw. Returns the new sidecar content."""
    record = deriv.read_record(out, deriv.sidecar_of(out / mask_rel))
    img = nib.load(record.mask)
    deriv.write_nifti_atomic(mask, record.mask, dtype=np.uint8, geometry=img.header)
    zooms = tuple(record.inputs["VoxelSizeMM"])
    rows = metrics.per_slice(mask, img.affine, zooms)
    summary = metrics.summary(mask, img.affine, zooms, rows)
    meta = dict(record.meta, Metrics=summary,
                Flags=metrics.quality_flags(mask, img.affine, rows, summary, zooms_mm=zooms))
    write_tsv_atomic(rows, out / record.outputs["morph"])
    write_json_atomic(meta, record.sidecar)
    for path in deriv.figure_paths(out, record.mask).values():
        path.unlink()
    return meta


def add_far_component(out: Path) -> tuple[int, int, int]:
    """Add to the real Leipzig mask a 2×2×1-voxel component (20 mm³ at 1×1×5 mm) in slice
    :data:`FAR_SLICE`, 30 mm towards the patient's left of the cord's edge (in the paraspinal
    muscle); returns its first voxel."""
    mask = np.asarray(nib.load(out / LEIPZIG_MASK).dataobj).copy()
    cord = np.argwhere(mask[..., FAR_SLICE])
    x = int(cord[:, 0].max()) + 31                                      # LAS: +x is the patient's left
    y = int(round(cord[:, 1].mean()))
    mask[x:x + 2, y:y + 2, FAR_SLICE] = 1
    rewrite_mask(out, LEIPZIG_MASK, mask)
    return x, y, FAR_SLICE


MOTION_TSV = "sub-errsm30/ses-01/func/sub-errsm30_ses-01_task-rest_run-01_desc-moco_motion.tsv"


def add_motion(out: Path) -> dict:
    """Give the 4D run what motion correction records (replacing what the participant level's
    motion correction wrote): a per-volume motion table (hand-made, fixed seed, two volumes above
    the threshold), the ``Motion`` summary and a ``motion`` flag; returns the summary and the
    high-motion volumes (``high``)."""
    rng = np.random.default_rng(7)
    n_volumes, n_slices, threshold = 30, 6, 0.5
    tx, ty = np.cumsum(rng.normal(0, 0.05, n_volumes)), np.cumsum(rng.normal(0, 0.05, n_volumes))
    tx[12:14] += [0.6, 0.9]
    fd = np.r_[0.0, np.hypot(np.diff(tx), np.diff(ty))]
    rows = []
    for t in range(n_volumes):
        row = {"volume": t, "framewise_displacement_mm": round(float(fd[t]), 4),
               "mean_translation_x_mm": round(float(tx[t]), 4), "mean_translation_y_mm": round(float(ty[t]), 4),
               "max_displacement_mm": round(float(np.hypot(tx[t], ty[t]) * 1.2), 4)}
        row.update({f"slice{s}_displacement_mm": round(float(np.hypot(tx[t], ty[t]) * (1 + s / 10)), 4)
                    for s in range(n_slices)})
        rows.append(row)
    write_tsv_atomic(rows, out / MOTION_TSV)
    high = [int(t) for t in np.flatnonzero(fd > threshold)]
    sidecar = deriv.sidecar_of(out / ERRSM30_MASK)
    meta = json.loads(sidecar.read_text())
    meta["Outputs"]["motion"] = MOTION_TSV
    meta["Motion"] = {"FramewiseDisplacementMeanMM": round(float(fd.mean()), 4),
                      "FramewiseDisplacementMaxMM": round(float(fd.max()), 4), "HighMotionVolumes": len(high),
                      "ThresholdMM": threshold, "Volumes": n_volumes}
    meta["Flags"].append({"code": "motion", "slices": [],
                          "message": f"large head motion: {len(high)} volumes above {threshold} mm ({high})"})
    write_json_atomic(meta, sidecar)
    return {**meta["Motion"], "high": high}


def set_confidence(out: Path, mask_rel: str, value: float) -> None:
    sidecar = deriv.sidecar_of(out / mask_rel)
    meta = json.loads(sidecar.read_text())
    meta["Metrics"]["confidence"] = value
    write_json_atomic(meta, sidecar)


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> tuple[Path, Path]:
    """The example dataset (a copy) and its participant-level outputs made by ``run.py``."""
    root = tmp_path_factory.mktemp("qc_browser")
    bids, out = root / "bids", root / "out"
    shutil.copytree(EXAMPLE, bids, ignore=shutil.ignore_patterns("derivatives"))
    done = run_app(bids, out, "participant", "--model-dir", DEMO_MODEL, "-w", root / "work",
                   "--skip-bids-validation")
    assert done.returncode == 0, done.stderr[-3000:]
    return bids, out


@pytest.fixture(scope="module")
def report(processed, tmp_path_factory) -> Path:
    """A copy of the participant-level outputs plus the hostile subject, with every subject page
    and the dataset report written."""
    out = tmp_path_factory.mktemp("qc_report") / "out"
    shutil.copytree(processed[1], out)
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


@pytest.fixture(scope="module")
def group_report(processed, tmp_path_factory) -> dict:
    """A copy of the participant-level outputs with the far component, the motion table and the
    confidence scores added, then the group level with ``--ground-truth`` run by ``run.py``."""
    bids = processed[0]
    root = tmp_path_factory.mktemp("qc_group")
    out = root / "out"
    shutil.copytree(processed[1], out)
    far = add_far_component(out)
    motion = add_motion(out)
    for mask_rel, value in ((BRAIN_MASK, 0.08), (ERRSM30_MASK, 0.64), (LEIPZIG_MASK, 0.93)):
        set_confidence(out, mask_rel, value)
    done = run_app(bids, out, "group", "--ground-truth", EXAMPLE / "derivatives" / "label", "-w", root / "work",
                   "--skip-bids-validation")
    assert done.returncode == 0, done.stderr[-3000:]
    with (out / "group_bold.tsv").open(newline="") as handle:
        table = {row["mask"]: row for row in csv.DictReader(handle, delimiter="\t")}
    return {"out": out, "far": far, "motion": motion, "table": table}


def open_at(driver, url: str, width: int = 1400, height: int = 900) -> None:
    driver.set_window_size(width, height)
    driver.get(url)


def image_ready(driver, element_id: str) -> bool:
    return wait_until(lambda: driver.execute_script(
        f"const i = document.getElementById('{element_id}'); return i.complete && i.naturalWidth > 0"))


def colour_pixels(png: bytes, rgb: tuple[int, int, int], tolerance: int = 40) -> int:
    """Pixels of a screenshot within ``tolerance`` of ``rgb`` (per channel)."""
    import io

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int)
    return int((np.abs(pixels - np.array(rgb)).max(axis=2) <= tolerance).sum())


def select_subject(driver, subject: str) -> int:
    names = header(driver)
    rows = driver.find_elements(By.CSS_SELECTOR, "#runs tbody tr")
    (index,) = [int(r.get_attribute("data-index")) for r in rows
                if cells(driver, int(r.get_attribute("data-index")))[names.index("Subject")] == subject]
    driver.find_element(By.CSS_SELECTOR, f'#runs tbody tr[data-index="{index}"]').click()
    assert selected(driver) == index
    return index


def test_far_component_is_visible_and_named_with_its_slice(group_report, browser):
    driver, out = browser, group_report["out"]
    sidecar = json.loads(deriv.sidecar_of(out / LEIPZIG_MASK).read_text())
    (flag,) = [f for f in sidecar["Flags"] if f["code"] == "components"]
    assert flag["slices"] == [FAR_SLICE] and f"#2 on slice {FAR_SLICE} (20 mm³" in flag["message"]
    assert flag["components"][0]["distance_mm"] >= 29.5
    # the figure: in the whole view, the component is drawn and ringed on its slice
    svg = deriv.figure_paths(out, out / LEIPZIG_MASK)["mosaic"].read_text()
    assert svg.count('class="ring flagged"') == 1 and ">#2</text>" in svg

    open_at(driver, (out / "qc" / "index.html").as_uri())
    assert severe(driver) == []
    select_subject(driver, "leipzigR01")
    flags = driver.find_element(By.ID, "v-flags").text
    assert f"components mask components away from the cord worth a look: #2 on slice {FAR_SLICE}" in flags
    (listed,) = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                 for tr in driver.find_elements(By.CSS_SELECTOR, "#v-components tbody tr")]
    assert listed[:2] == ["#2", str(FAR_SLICE)] and listed[-1] == "flagged: worth a look"
    assert listed[3:5] == ["4", "20"] and float(listed[5]) >= 29.5
    assert driver.execute_script("const v = document.getElementById('viewer'); return v.scrollWidth <= v.clientWidth")
    mosaic = driver.find_element(By.ID, "v-mosaic")
    cord_view = mosaic.screenshot_as_png
    press(driver, "w")
    assert mosaic.get_attribute("src").endswith("_desc-mosaic_mask.svg#contour-full")
    assert driver.find_element(By.ID, "v-full").get_attribute("aria-pressed") == "true"
    assert image_ready(driver, "v-mosaic")
    time.sleep(0.3)
    whole_view = mosaic.screenshot_as_png
    orange = (255, 122, 0)   # the flagged component's ring: only in the whole view (it is out of the 30 mm tile)
    assert colour_pixels(whole_view, orange, 30) > colour_pixels(cord_view, orange, 30) + 20
    screenshot(driver, "index_far_component_whole_field.png")
    press(driver, "w")
    assert mosaic.get_attribute("src").endswith("#contour")
    assert severe(driver) == []
    # the subject page lists every component, measured from the mask
    open_at(driver, (out / "sub-leipzigR01.html").as_uri(), 1500, 950)
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in driver.find_elements(By.CSS_SELECTOR, "details.components tbody tr")]
    assert [r[:2] for r in rows] == [["#1", "0–23"], ["#2", str(FAR_SLICE)]]
    assert rows[0][-1] == "cord (largest)" and rows[1][-1] == "flagged: worth a look"
    assert severe(driver) == []


def test_ground_truth_contours_toggle_and_dice(group_report, browser):
    driver, out = browser, group_report["out"]
    svg = deriv.figure_paths(out, out / LEIPZIG_MASK)["mosaic"].read_text()
    assert '<path class="ref"' in svg and 'class="ov-contour main"' in svg
    slices = {}
    with (out / "group_accuracy_slices.tsv").open(newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            if row["mask"] == LEIPZIG_MASK:
                slices[int(row["slice"])] = float(row["dice"])
    assert len(slices) == 24
    for index, dice in slices.items():                                   # the group's per-slice Dice, under its tile
        assert f">Dice {dice:.2f}</text>" in svg
    other = deriv.figure_paths(out, out / ERRSM30_MASK)["mosaic"].read_text()
    assert 'class="ref"' not in other and "Dice" not in other            # no manual mask for that run

    open_at(driver, (out / "qc" / "index.html").as_uri())
    names = header(driver)
    assert {"Dice", "HD95 mm", "Conf.", "FD max"} <= set(names)          # z-scores need 5 runs
    index = select_subject(driver, "leipzigR01")
    dice = float(group_report["table"][LEIPZIG_MASK]["dice"])
    assert 0.5 < dice <= 1 and cells(driver, index)[names.index("Dice")] == f"{dice:.2f}"
    assert f"Dice\n{dice:g}" in driver.find_element(By.ID, "v-metrics").text
    button, legend = driver.find_element(By.ID, "v-reference"), driver.find_element(By.ID, "v-reference-legend")
    assert button.is_displayed() and legend.is_displayed()
    assert "sub-leipzigR01_task-rest_desc-spinalcordmask.nii.gz" in legend.text
    mosaic = driver.find_element(By.ID, "v-mosaic")
    assert image_ready(driver, "v-mosaic")
    time.sleep(0.3)
    cyan, red = (0, 229, 255), (255, 48, 48)
    both = mosaic.screenshot_as_png
    screenshot(driver, "index_ground_truth.png")
    press(driver, "g")                                                   # keyboard: manual mask off
    assert mosaic.get_attribute("src").endswith("#contour-noref") and not legend.is_displayed()
    assert image_ready(driver, "v-mosaic")
    time.sleep(0.3)
    ours_only = mosaic.screenshot_as_png
    # the captions' Dice stays cyan; the dashed contours go
    assert colour_pixels(both, cyan, 30) > colour_pixels(ours_only, cyan, 30) + 400
    assert colour_pixels(ours_only, red, 30) > 500
    button.click()                                                       # the button: back on
    assert mosaic.get_attribute("src").endswith("#contour") and legend.is_displayed()
    press(driver, Keys.ARROW_RIGHT)                                      # our mask off: only the manual one
    assert mosaic.get_attribute("src").endswith("#none")
    time.sleep(0.3)
    manual_only = mosaic.screenshot_as_png
    assert colour_pixels(manual_only, cyan, 30) > colour_pixels(ours_only, cyan, 30) + 400
    assert colour_pixels(manual_only, red, 30) < 50
    press(driver, Keys.ARROW_RIGHT)
    select_subject(driver, "errsm30")
    assert not driver.find_element(By.ID, "v-reference").is_displayed()
    assert severe(driver) == []

    # the subject page, rebuilt by the group level: Dice, both contours, the toggle
    open_at(driver, (out / "sub-leipzigR01.html").as_uri(), 1500, 950)
    text = driver.find_element(By.TAG_NAME, "body").text
    assert "Group level" in text and f"Dice\n{dice:g}" in text and "HD95 mm" in text
    assert re.search(r"TaskName: “?rest”?", text) and re.search(r"Task name\s+rest\n", text)   # a 3D mean
    assert "manual mask sub-leipzigR01_task-rest_desc-spinalcordmask.nii.gz" in text
    toggle = driver.find_element(By.ID, "reference-toggle")
    images = driver.find_elements(By.CSS_SELECTOR, "img.overlay")
    assert wait_until(lambda: driver.execute_script(
        "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"))
    screenshot(driver, "subject_ground_truth.png", full_page=True)
    toggle.click()
    assert all(i.get_attribute("src").endswith("#contour-noref") for i in images)
    press(driver, "g", "w")
    assert all(i.get_attribute("src").endswith("#contour-full") for i in images)
    assert toggle.get_attribute("aria-pressed") == "true"
    assert severe(driver) == []


def test_motion_confidence_task_name_and_table_width(group_report, browser):
    driver, out = browser, group_report["out"]
    open_at(driver, (out / "qc" / "index.html").as_uri())
    names = header(driver)
    # the table fits the panel at 1400 px: no horizontal scrolling, no flag cut off
    assert driver.execute_script("const w = document.querySelector('.table-wrap'); "
                                 "return w.scrollWidth <= w.clientWidth")
    for cell in driver.find_elements(By.CSS_SELECTOR, "#runs td.flags"):
        assert driver.execute_script("return arguments[0].scrollWidth <= arguments[0].clientWidth", cell)
    assert "Task" not in names                                           # one task for every run: above the table
    assert "Task rest" in driver.find_element(By.CSS_SELECTOR, ".constant").text
    # confidence: sortable, least certain first
    driver.find_element(By.CSS_SELECTOR, '#runs th[data-key="confidence"] button').click()
    order = [cells(driver, int(r.get_attribute("data-index")))[names.index("Subject")]
             for r in driver.find_elements(By.CSS_SELECTOR, "#runs tbody tr")]
    assert order == ["brain01", "errsm30", "leipzigR01"]
    values = [cells(driver, int(r.get_attribute("data-index")))[names.index("Conf.")]
              for r in driver.find_elements(By.CSS_SELECTOR, "#runs tbody tr")]
    assert values == ["0.08", "0.64", "0.93"]
    index = select_subject(driver, "errsm30")
    assert cells(driver, index)[names.index("FD max")] == f"{group_report['motion']['FramewiseDisplacementMaxMM']:.2f}"
    assert "motion" in cells(driver, index)[names.index("Flags")]
    screenshot(driver, "index_1400.png")
    # the widest table: a group level of 5+ runs adds the z-scores; a rated run; still no scrolling
    wide = out.parent / "wide"
    shutil.copytree(out, wide)
    columns = {"z_volume_mm3": -12.3456, "z_mean_area_mm2": 4.5678, "dice": 0.9123, "hd95_mm": 12.5,
               "dice_common": 0.91, "hd95_mm_common": 2.0, "volume_diff_mm3": -1234.5, "volume_diff_percent": -12.3,
               "common_slices": 24}
    qc.write_dataset_report(wide, extra={m: {"columns": columns, "flags": [
        {"code": "outlier_volume_mm3", "message": "small"}, {"code": "outlier_mean_area_mm2", "message": "big"}]}
        for m in (LEIPZIG_MASK, ERRSM30_MASK, BRAIN_MASK)})
    open_at(driver, (wide / "qc" / "index.html").as_uri())
    assert {"z vol.", "z area", "Dice", "HD95 mm", "Conf.", "FD max"} <= set(header(driver))
    press(driver, "f", "f", "f", "j", "f")
    assert driver.execute_script("const w = document.querySelector('.table-wrap'); "
                                 "return w.scrollWidth <= w.clientWidth")
    for cell in driver.find_elements(By.CSS_SELECTOR, "#runs td.flags"):
        assert driver.execute_script("return arguments[0].scrollWidth <= arguments[0].clientWidth", cell)
    screenshot(driver, "index_1400_widest.png")
    driver.execute_script("window.localStorage.clear()")

    # every code in the legend, the coming ones included
    legend = driver.find_element(By.ID, "legend-title").find_element(By.XPATH, "..").text
    for code in ("geometry", "timing", "motion", "components", "edge", "gaps", "area", "empty"):
        assert f"{code}\n" in legend
    assert severe(driver) == []

    # the 4D run's subject page: the motion plot and its summary
    open_at(driver, (out / "sub-errsm30.html").as_uri(), 1500, 950)
    plot = driver.find_element(By.CSS_SELECTOR, "details.motion img")
    assert plot.get_attribute("src").startswith("data:image/svg+xml;base64,")
    assert wait_until(lambda: driver.execute_script("return arguments[0].naturalWidth > 0", plot))
    text = driver.find_element(By.TAG_NAME, "body").text
    high = group_report["motion"]["high"]
    assert f"High-motion volumes\n{len(high)} (FD > 0.5 mm)" in text
    svg = base64.b64decode(plot.get_attribute("src").split(",", 1)[1]).decode()
    assert svg.count('r="3" fill="#ff3030"') == len(high) == 2                 # the volumes above the threshold
    assert ">along x</text>" in svg and ">along y</text>" in svg and ">threshold 0.5 mm</text>" in svg
    assert "Confidence\n0.640 (0–1, higher = more certain)" in text
    driver.execute_script("arguments[0].scrollIntoView()", driver.find_element(By.CSS_SELECTOR, "section.run"))
    screenshot(driver, "subject_motion.png", full_page=True)
    # TaskName of the 3D mean (from the dataset's inherited sidecar)
    open_at(driver, (out / "sub-leipzigR01.html").as_uri(), 1500, 950)
    assert re.search(r"TaskName: “?rest”?$", driver.find_element(By.CSS_SELECTOR, "section.run .path").text)
    assert severe(driver) == []


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
