"""QC figures and pages: geometry on tiny arrays with known values, determinism, escaping, locking.

The arrays are ``np.arange`` volumes on hand-made affines, so every displayed voxel is known.
Output folders are written with the project's own writers (real NIfTI and JSON files).
"""

from __future__ import annotations

import base64
import json
import re
import struct
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import (aff2axcodes, apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation,
                                  ornt_transform)

from episeg_bids import derivatives as deriv
from episeg_bids.accuracy import per_slice_dice
from episeg_bids.atomic import write_json_atomic, write_tsv_atomic
from episeg_bids import metrics, qc
from episeg_bids import qc_figures as fig

HOSTILE_TASK = "<script>window.__xss=2</script>"
HOSTILE_LABEL = "xss<img src=x onerror=window.__xss=1>"


def reoriented(data: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """The same physical image stored with the axes ``codes`` (e.g. 'PIR')."""
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(codes)))
    return apply_orientation(data, transform), affine @ inv_ornt_aff(transform, data.shape)


# --- display orientation ------------------------------------------------------------------------

def test_to_display_ras_is_superior_first_anterior_up_left_on_left():
    data = np.arange(2 * 3 * 4, dtype=float).reshape(2, 3, 4)          # X=2 (→R), Y=3 (→A), Z=4 (→S)
    volume = fig.to_display(data, data > 5, np.eye(4), (1.0, 2.0, 3.0))
    # display[s, r, c] = data[c, Y-1-r, Z-1-s]: slice 0 is the top Z, row 0 the most anterior Y,
    # column 0 the patient's left (smallest X in RAS+)
    expected = data[:, ::-1, ::-1].transpose(2, 1, 0)
    np.testing.assert_array_equal(volume.image, expected)
    np.testing.assert_array_equal(volume.mask, expected > 5)
    assert volume.slices.tolist() == [3, 2, 1, 0]
    assert volume.axes == (2, 1, 0)
    assert volume.zooms_mm == (3.0, 2.0, 1.0)


def test_to_display_las_flips_left_right():
    data = np.arange(24, dtype=float).reshape(2, 3, 4)
    volume = fig.to_display(data, data > 0, np.diag([-1.0, 1, 1, 1]), (1, 1, 1))
    np.testing.assert_array_equal(volume.image, data[::-1, ::-1, ::-1].transpose(2, 1, 0))
    assert volume.slices.tolist() == [3, 2, 1, 0]


@pytest.mark.parametrize("codes", ["LAS", "RAS", "PIR", "SLP", "AIL"])
def test_same_picture_whatever_the_storage_order(codes):
    world = np.arange(6 * 7 * 5, dtype=float).reshape(6, 7, 5)
    affine = np.diag([1.5, 1.5, 4.0, 1.0])
    affine[:3, 3] = [-4, 3, 10]
    reference = fig.to_display(world, world % 3 == 0, affine, (1.5, 1.5, 4.0))
    data, stored_affine = reoriented(world, affine, codes)
    assert "".join(aff2axcodes(stored_affine)) == codes
    zooms = tuple(float(z) for z in np.linalg.norm(stored_affine[:3, :3], axis=0))
    volume = fig.to_display(data, data % 3 == 0, stored_affine, zooms)
    np.testing.assert_array_equal(volume.image, reference.image)
    np.testing.assert_array_equal(volume.mask, reference.mask)
    assert volume.zooms_mm == reference.zooms_mm
    # slice numbers: the voxel index in *this* file along its superior-inferior axis
    axis = metrics.slice_axis(stored_affine)
    assert volume.axes[0] == axis
    superior_first = codes[axis] == "I"
    assert volume.slices.tolist() == (list(range(5)) if superior_first else list(range(4, -1, -1)))
    for tile, expected, s in zip(fig.axial_tiles(volume, fov_mm=6.0), fig.axial_tiles(reference, fov_mm=6.0),
                                 volume.slices.tolist()):
        np.testing.assert_array_equal(tile.image, expected.image)
        assert (tile.centre, tile.slice) == (expected.centre, s)


def test_las_and_ras_copies_give_the_same_svg_bytes():
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (12, 12, 5))
    mask = np.zeros(image.shape, np.uint8)
    mask[5:8, 4:7, 1:4] = 1
    affine = np.diag([-1.0, 1, 3, 1])                                    # LAS
    ras_image, ras_affine = reoriented(image, affine, "RAS")
    ras_mask, _ = reoriented(mask, affine, "RAS")
    rows = metrics.per_slice(mask, affine, (1, 1, 3))
    las = fig.run_figures(image, mask, affine, (1, 1, 3), rows)
    ras = fig.run_figures(ras_image, ras_mask, ras_affine, (1, 1, 3), rows)
    assert (las["mosaic"], las["area"]) == (ras["mosaic"], ras["area"])
    # the sagittal view differs only by the plane's voxel index, which is that of each file
    assert "plane: voxel 6 of axis 0" in las["sagittal"]
    assert las["sagittal"].replace("voxel 6 of", "voxel 5 of") == ras["sagittal"]


def test_oblique_affine_uses_the_closest_axes():
    angle = np.deg2rad(10)
    affine = np.eye(4)
    affine[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    data = np.arange(24, dtype=float).reshape(2, 3, 4)
    volume = fig.to_display(data, data > 0, affine, (1, 1, 1))
    np.testing.assert_array_equal(volume.image, data[:, ::-1, ::-1].transpose(2, 1, 0))


# --- tiles: centre, crop, empty slices ----------------------------------------------------------

def test_tile_is_centred_on_the_slice_centroid_and_cropped_to_the_field_of_view():
    image = np.arange(1 * 9 * 9, dtype=float).reshape(1, 9, 9)
    mask = np.zeros((1, 9, 9), bool)
    mask[0, 3, 7] = True
    volume = fig.DisplayVolume(image, mask, (np.array([0]), np.arange(9), np.arange(9)), (2, 1, 0), (1.0, 1.0, 1.0))
    (tile,) = fig.axial_tiles(volume, fov_mm=5.0)                         # 5 voxels of 1 mm
    assert tile.centre == (3.0, 7.0)
    assert tile.origin == (1, 5)
    assert tile.mask[2, 2] and tile.mask.sum() == 1                       # the cord voxel in the middle
    np.testing.assert_array_equal(tile.image[:, :4], image[0, 1:6, 5:9])
    assert np.isnan(tile.image[:, 4]).all()                               # beyond the image: not data
    assert tile.has_cord and tile.outside == 0


def test_empty_slices_are_shown_marked_and_centred_on_the_nearest_slice_with_cord():
    mask = np.zeros((5, 9, 9), bool)
    mask[0, 2, 2] = True                                                  # display slice 0 (superior)
    mask[4, 6, 6] = True
    centres, covered = fig.tile_centres(mask)
    assert covered.tolist() == [True, False, False, False, True]
    assert centres[1].tolist() == [2, 2] and centres[3].tolist() == [6, 6]
    assert centres[2].tolist() == [2, 2]                                  # tie: the more superior one
    image = np.arange(mask.size, dtype=float).reshape(mask.shape)
    volume = fig.DisplayVolume(image, mask, (np.arange(5)[::-1], np.arange(9), np.arange(9)), (2, 1, 0), (1, 1, 1))
    svg = fig.mosaic_svg(volume, rows=[])
    assert len(fig.axial_tiles(volume)) == 5                              # every slice has a tile
    assert svg.count(">no cord</text>") == 3


def test_no_cord_at_all_centres_on_the_image():
    centres, covered = fig.tile_centres(np.zeros((2, 4, 6), bool))
    assert not covered.any() and centres.tolist() == [[1.5, 2.5], [1.5, 2.5]]


def test_tile_follows_the_largest_island_and_counts_the_voxels_left_outside():
    mask = np.zeros((1, 40, 40), bool)
    mask[0, 20, 20] = mask[0, 20, 21] = mask[0, 0, 0] = True
    volume = fig.DisplayVolume(np.zeros(mask.shape), mask, (np.array([0]), np.arange(40), np.arange(40)),
                               (2, 1, 0), (1, 1, 1))
    (tile,) = fig.axial_tiles(volume, fov_mm=10)
    assert tile.centre == (20.0, 20.5) and tile.outside == 1


def test_whole_factors_respect_the_voxel_size_ratio():
    assert fig.whole_factors((1.0, 1.0), 128, (30, 30)) == (4, 4)
    assert fig.whole_factors((16.8, 0.956), 320, (6, 68), max_px=320) == (54, 3)   # 16.8/0.956 ≈ 18, ×3
    assert fig.whole_factors((2.0, 1.0), 10, (50, 50)) == (2, 1)


def test_sagittal_plane_through_the_median_left_right_position_superior_up():
    image = np.arange(3 * 4 * 5, dtype=float).reshape(3, 4, 5)           # display (S, R, C)
    mask = np.zeros(image.shape, bool)
    mask[:, 1, 3] = True
    mask[0, 2, 1] = True
    volume = fig.DisplayVolume(image, mask, (np.arange(3), np.arange(4), np.arange(5)), (2, 1, 0), (3, 1, 1))
    plane, plane_mask, column, row0 = fig.sagittal_plane(volume)
    assert column == 3 and row0 == 0
    np.testing.assert_array_equal(plane, image[:, :, 3])                 # row 0 = most superior slice
    assert plane_mask[:, 1].all() and plane_mask.sum() == 3


def test_contour_follows_voxel_edges():
    assert fig.contour_path(np.array([[True]]), 10, 20, 4, 3) == "M10 20H14M10 23H14M10 20V23M14 20V23"
    assert fig.fill_path(np.array([[False, True, True]]), 0, 0, 2, 2) == "M2 0h4v2h-4z"
    assert fig.fill_path(np.zeros((3, 3), bool), 0, 0, 1, 1) == fig.contour_path(np.zeros((3, 3), bool), 0, 0, 1, 1) == ""


def test_paths_print_coordinates_as_python_numbers():
    """One format call for all runs prints exactly what one f-string per run would: ints as ints,
    floats as Python prints them (``0.0``, ``2.5``)."""
    assert fig.fill_path(np.array([[True, False, True]]), 0.5, 1, 1.5, 2) == "M0.5 1h1.5v2h-1.5zM3.5 1h1.5v2h-1.5z"
    assert fig.contour_path(np.array([[True]]), 0, 0, 2.5, 1) == "M0.0 0H2.5M0.0 1H2.5M0.0 0V1M2.5 0V1"
    rng = np.random.default_rng(3)
    mask = rng.random((40, 30)) < 0.4
    runs = [(r, a, b) for r in range(40) for a, b in _runs(mask[r])]
    assert fig.fill_path(mask, 3, 7, 2, 3) == "".join(f"M{3 + a * 2} {7 + r * 3}h{(b - a) * 2}v3h{-(b - a) * 2}z"
                                                       for r, a, b in runs)


def _runs(row: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of True in a 1D bool array, by a plain loop."""
    out, start = [], None
    for i, value in enumerate([*row.tolist(), False]):
        if value and start is None:
            start = i
        elif not value and start is not None:
            out.append((start, i))
            start = None
    return out


# --- files: PNG, SVG, determinism ---------------------------------------------------------------

def decode_grey_png(data: bytes) -> np.ndarray:
    """Decode the PNG subset written by :func:`qc_figures.png_bytes` (8-bit grey, filter Up)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,), tag = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(tag + body)
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 0)
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, width + 1)
    assert (raw[:, 0] == 2).all()
    return np.cumsum(raw[:, 1:].astype(np.int64), axis=0).astype(np.uint8)


def test_png_round_trip_and_determinism():
    grey = (np.arange(7 * 5).reshape(7, 5) * 7 % 256).astype(np.uint8)
    assert fig.png_bytes(grey) == fig.png_bytes(grey.copy())
    np.testing.assert_array_equal(decode_grey_png(fig.png_bytes(grey)), grey)


def test_tile_pixels_are_whole_factor_repeats_without_interpolation():
    image = np.zeros((6, 6, 2))
    image[2:4, 2:4, :] = 100.0
    mask = image > 0
    svg = fig.run_figures(image, mask, np.eye(4), (1, 1, 1), metrics.per_slice(mask, np.eye(4), (1, 1, 1)))["mosaic"]
    cord_view, whole_view = (re.search(r'class="v-%s">.*?base64,([A-Za-z0-9+/=]+)"' % view, svg, re.S)
                             for view in ("cord", "full"))
    pixels = decode_grey_png(base64.b64decode(cord_view.group(1)))
    assert set(np.unique(pixels).tolist()) <= {0, 255}                   # two grey levels, no blur
    assert whole_view is None                                            # it reuses the sprite in <defs>
    sprite = decode_grey_png(base64.b64decode(re.search(r'<defs><image id="fov".*?base64,([A-Za-z0-9+/=]+)"',
                                                        svg).group(1)))
    assert sprite.shape == (2 * 6, 6) and set(np.unique(sprite).tolist()) <= {0, 255}   # slices stacked, no blur


def test_figures_are_written_atomically_and_deterministically(tmp_path):
    image = np.arange(10 * 10 * 3, dtype=np.float32).reshape(10, 10, 3)
    mask = np.zeros(image.shape, np.uint8)
    mask[4:6, 4:6, :] = 1
    rows = metrics.per_slice(mask, np.eye(4), (1, 1, 2))
    mask_path = tmp_path / "sub-01" / "func" / "sub-01_task-rest_space-orig_label-SC_mask.nii.gz"
    first = qc.write_run_figures(tmp_path, mask_path, image, mask, np.eye(4), (1, 1, 2), rows)
    assert first == {k: f"sub-01/figures/sub-01_task-rest_space-orig_label-SC_desc-{k}_mask.svg"
                     for k in ("mosaic", "sagittal", "area")}
    before = {k: (tmp_path / v).read_bytes() for k, v in first.items()}
    qc.write_run_figures(tmp_path, Path(mask_path.relative_to(tmp_path)), image, mask, np.eye(4), (1, 1, 2), rows)
    assert before == {k: (tmp_path / v).read_bytes() for k, v in first.items()}
    written = sorted(p.name for p in (tmp_path / "sub-01" / "figures").iterdir())
    assert written == sorted(Path(v).name for v in first.values())        # no temporary file left


def test_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match=r"image shape \(2, 2, 2\) and mask shape \(2, 2\)"):
        fig.to_display(np.zeros((2, 2, 2)), np.zeros((2, 2)), np.eye(4), (1, 1, 1))


# --- pages ----------------------------------------------------------------------------------------

def write_run(output_dir: Path, subject: str, *, task_name: str = "rest", flags_extra: list | None = None) -> Path:
    """A participant-level output (mean, mask, sidecars) of a synthetic 4D run, with real writers."""
    folder = output_dir / f"sub-{subject}" / "func"
    stem = f"sub-{subject}_task-rest"
    affine = np.diag([-1.0, 1.0, 4.0, 1.0])
    rng = np.random.default_rng(1)
    image = rng.normal(50, 5, (16, 16, 4)).astype(np.float32)
    mask = np.zeros(image.shape, np.uint8)
    mask[6:11, 6:11, 1:4] = 1
    image[mask > 0] += 60
    zooms = (1.0, 1.0, 4.0)
    rows = metrics.per_slice(mask, affine, zooms)
    summary = metrics.summary(mask, affine, zooms)
    mean = folder / f"{stem}_desc-mean_bold.nii.gz"
    deriv.write_nifti_atomic(image[..., None], mean, affine=affine, dtype=np.float32)
    write_json_atomic({"TaskName": task_name}, folder / f"{stem}_desc-mean_bold.json")
    mask_path = folder / f"{stem}_space-orig_label-SC_mask.nii.gz"
    deriv.write_nifti_atomic(mask, mask_path, affine=affine, dtype=np.uint8)
    write_json_atomic({
        "Description": "test mask", "Sources": ["bids::" + mean.relative_to(output_dir).as_posix()],
        "Input": {"Path": f"sub-{subject}/func/{stem}_bold.nii.gz", "Kind": "4D run", "Shape": [16, 16, 4, 3]},
        "Model": {"Name": "demo<b>", "IsDemoModel": True}, "Metrics": summary,
        "Flags": metrics.quality_flags(mask, affine, rows, summary) + (flags_extra or []),
        "Notes": [HOSTILE_TASK], "DateProcessed": "2026-01-01T00:00:00+00:00",
    }, folder / f"{stem}_space-orig_label-SC_mask.json")
    return mask_path


def embedded_data(html: str) -> dict:
    block = re.search(r'<script type="application/json" id="qc-data">(.*?)</script>', html, re.S).group(1)
    return json.loads(block)


def test_hostile_names_and_metadata_are_escaped(tmp_path):
    write_run(tmp_path, HOSTILE_LABEL, task_name=HOSTILE_TASK,
              flags_extra=[{"code": "x<i>", "message": "<img src=x onerror=alert(1)>", "slices": []}])
    page = qc.write_subject_page(tmp_path, "sub-" + HOSTILE_LABEL)
    report = qc.write_dataset_report(tmp_path, extra={
        f"sub-{HOSTILE_LABEL}/func/sub-{HOSTILE_LABEL}_task-rest_space-orig_label-SC_mask.nii.gz":
            {"columns": {"<b>z</b>": 4.2}, "flags": [{"code": "outlier<x>", "message": HOSTILE_TASK}]}})
    assert page.name == f"sub-{HOSTILE_LABEL}.html"
    for html in (page.read_text(), report.read_text()):
        assert "<script>window" not in html and "<img src=x" not in html and "<b>" not in html
        assert html.count("<script") == 1 + ("qc-data" in html)          # the page's own scripts only
        assert "script-src &#39;sha256-" in html                             # and a CSP that allows only them
    assert "&lt;script&gt;window.__xss=2&lt;/script&gt;" in page.read_text()
    text = report.read_text()
    assert r"\u003cscript\u003ewindow.__xss=2\u003c/script\u003e" in text
    data = embedded_data(text)
    (run,) = data["runs"]
    assert run["task_name"] == HOSTILE_TASK                               # the text itself, shown literally
    assert run["cells"]["subject"] == HOSTILE_LABEL and run["cells"]["<b>z</b>"] == 4.2
    assert run["page"].startswith("../sub-xss%3Cimg%20src%3Dx%20onerror%3D")


def test_dataset_report_lists_every_run_with_flags_figures_and_group_columns(tmp_path):
    write_run(tmp_path, "01")
    write_run(tmp_path, "02", flags_extra=[{"code": "gaps", "message": "gap", "slices": [2]}])
    report = qc.write_dataset_report(tmp_path, extra={
        "sub-02/func/sub-02_task-rest_space-orig_label-SC_mask.nii.gz":
            {"columns": {"z_volume_mm3": 3.9}, "flags": [{"code": "outlier_volume_mm3", "message": "big"}]}})
    data = embedded_data(report.read_text())
    assert [r["cells"]["subject"] for r in data["runs"]] == ["01", "02"]
    second = data["runs"][1]
    codes = [(f["code"], f["source"]) for f in second["flags"]]
    assert codes[-2:] == [("gaps", "run"), ("outlier_volume_mm3", "group")]
    (column,) = [c for c in data["columns"] if c["key"] == "z_volume_mm3"]
    assert (column["label"], column["numeric"], column["table"], column["extra"]) == ("z vol.", True, True, True)
    assert ["z vol.", "3.9"] in second["metrics"]                          # and in the viewer's metrics
    for href in second["figures"].values():                               # rebuilt from the files on disk
        assert (tmp_path / "qc" / href.replace("%20", " ")).resolve().is_file()
    assert "outlier_volume_mm3" in report.read_text().split('id="qc-data"')[0]   # in the legend
    # a later participant job (extra=None) keeps the group columns of the last group level
    data = embedded_data(qc.write_dataset_report(tmp_path).read_text())
    assert data["runs"][1]["cells"]["z_volume_mm3"] == 3.9


def test_subject_page_shows_each_run_with_provenance(tmp_path):
    write_run(tmp_path, "01")
    html = qc.write_subject_page(tmp_path, "01").read_text()
    assert html.count('<section class="run" id="run-sub-01_task-rest_space-orig_label-SC"') == 1
    assert "DEMO model" in html and "demo&lt;b&gt;" in html
    assert 'src="sub-01/figures/sub-01_task-rest_space-orig_label-SC_desc-mosaic_mask.svg"' in html
    with pytest.raises(ValueError, match="not a BIDS label"):
        qc.write_subject_page(tmp_path, "../etc")


def _report(output_dir: str) -> int:
    return len(qc.write_dataset_report(Path(output_dir)).read_text())


def test_concurrent_writers_leave_a_complete_report(tmp_path):
    for label in ("01", "02", "03"):
        write_run(tmp_path, label)
    qc.write_dataset_report(tmp_path)
    with ProcessPoolExecutor(max_workers=3) as pool:
        sizes = list(pool.map(_report, [str(tmp_path)] * 6))
    html = (tmp_path / "qc" / "index.html").read_text()
    assert html.rstrip().endswith("</html>") and len(embedded_data(html)["runs"]) == 3
    assert len(html) in sizes
    assert not [p for p in (tmp_path / "qc").iterdir() if p.name.startswith(".index")]   # no temp file left


# --- components, manual mask, group results, motion, confidence ---------------------------------

def test_whole_field_view_rings_a_far_component_on_its_slice():
    image = np.random.default_rng(3).normal(100, 5, (40, 40, 4))
    mask = np.zeros(image.shape, np.uint8)
    mask[18:23, 18:23, :] = 1
    mask[36:38, 2:4, 1] = 1                                              # 2×2×1 voxels of 1×1×5 mm, far
    affine, zooms = np.diag([1.0, 1.0, 5.0, 1.0]), (1.0, 1.0, 5.0)
    rows = metrics.per_slice(mask, affine, zooms)
    flags = metrics.quality_flags(mask, affine, rows, metrics.summary(mask, affine, zooms, rows))
    svg = fig.run_figures(image, mask, affine, zooms, rows, flags)["mosaic"]
    assert all(f'<g id="{name}"/>' in svg for name in ("contour", "fill-full", "none-full-noref"))
    assert svg.count("<svg x=") == 4                                     # one whole-field viewport per slice
    assert svg.count('class="ring flagged"') == 1 and ">#2</text>" in svg   # on slice 1 only
    assert svg.count('<rect class="crop"') == 4                          # the 30 mm window in each
    assert 'class="ov-contour other"' in svg                             # drawn in the other components' colour
    assert ">components</text>" in svg                                   # the flag code on its tile


def test_subject_page_uses_the_components_already_measured(tmp_path):
    mask_path = write_run(tmp_path, "01")
    img = nib.load(mask_path)
    mask = np.asarray(img.dataobj).copy()
    mask[0:2, 14:16, 0] = 1                                              # a far second component
    deriv.write_nifti_atomic(mask, mask_path, affine=img.affine, dtype=np.uint8)
    sidecar = deriv.sidecar_of(mask_path)
    meta = json.loads(sidecar.read_text())
    meta["Metrics"]["components"] = 2
    write_json_atomic(meta, sidecar)
    key = mask_path.relative_to(tmp_path).as_posix()
    table = metrics.describe_components(mask, img.affine, (1.0, 1.0, 4.0))
    from_disk = qc.write_subject_page(tmp_path, "01").read_text()
    assert from_disk == qc.write_subject_page(tmp_path, "01", measured={key: table}).read_text()
    assert '<td class="num">4</td>' in from_disk                        # the far piece: 4 voxels
    marked = [dict(c, voxels=c["voxels"] + 1000) for c in table]        # proves the table is the one shown
    assert '<td class="num">1004</td>' in qc.write_subject_page(tmp_path, "01", measured={key: marked}).read_text()


def write_manual(output_dir: Path, mask_path: Path, shift: int) -> Path:
    """A manual mask on the run's grid: the run's mask moved ``shift`` voxels along x."""
    img = nib.load(mask_path)
    truth = np.roll(np.asarray(img.dataobj), shift, axis=0)
    path = output_dir.parent / "manual" / mask_path.name.replace("space-orig_label-SC_mask", "desc-spinalcordmask")
    deriv.write_nifti_atomic(truth, path, dtype=np.uint8, geometry=img.header)
    return path


def test_manual_mask_drawn_with_per_slice_dice_then_removed(tmp_path):
    out = tmp_path / "out"
    mask_path = write_run(out, "01")
    key = mask_path.relative_to(out).as_posix()
    truth = write_manual(out, mask_path, 1)
    qc.write_dataset_report(out, extra={key: {"columns": {"dice": 0.8, "hd95_mm": 1.0, "z_volume_mm3": -3.8},
                                              "flags": [{"code": "outlier_volume_mm3", "message": "small"}],
                                              "ground_truth": str(truth)}})
    mosaic = deriv.figure_paths(out, mask_path)["mosaic"]
    svg = mosaic.read_text()
    assert '<path class="ref"' in svg
    pred, ref = np.asarray(nib.load(mask_path).dataobj), np.asarray(nib.load(truth).dataobj)
    expected = per_slice_dice(pred, ref, 2)
    assert [r["slice"] for r in expected] == [1, 2, 3]
    for row in expected:
        assert f">Dice {row['dice']:.2f}</text>" in svg
    data = embedded_data((out / "qc" / "index.html").read_text())
    assert data["runs"][0]["reference"] == truth.name and data["runs"][0]["cells"]["dice"] == 0.8
    # a participant job later: the subject page keeps the group's results and the manual mask
    html = qc.write_subject_page(out, "01").read_text()
    assert 'id="reference-toggle"' in html and f"manual mask <code>{truth.name}</code>" in html
    assert "<dt>Dice</dt><dd>0.8</dd>" in html and "<dt>HD95 mm</dt><dd>1</dd>" in html
    assert "<dt>z vol.</dt><dd>-3.8</dd>" in html
    assert '<span class="chip group">outlier_volume_mm3</span> small (group level)' in html
    # a group level without --ground-truth: the figure is drawn again without it
    qc.write_dataset_report(out, extra={key: {"columns": {}, "flags": []}})
    assert 'class="ref"' not in mosaic.read_text() and "Dice" not in mosaic.read_text()
    assert 'id="reference-toggle"' not in qc.write_subject_page(out, "01").read_text()


def test_group_results_of_a_recomputed_mask_are_not_shown(tmp_path):
    mask_path = write_run(tmp_path, "01")
    key = mask_path.relative_to(tmp_path).as_posix()
    qc.write_dataset_report(tmp_path, extra={key: {"columns": {"z_volume_mm3": 4.2},
                                                   "flags": [{"code": "outlier_volume_mm3", "message": "big"}]}})
    sidecar = deriv.sidecar_of(mask_path)
    meta = json.loads(sidecar.read_text())
    meta["DateProcessed"] = "2999-01-01T00:00:00+00:00"                  # the participant level ran again since
    write_json_atomic(meta, sidecar)
    data = embedded_data(qc.write_dataset_report(tmp_path).read_text())
    assert data["runs"][0]["cells"].get("z_volume_mm3") is None
    assert [f["code"] for f in data["runs"][0]["flags"]] == []


def test_motion_table_is_plotted_on_the_subject_page(tmp_path):
    mask_path = write_run(tmp_path, "01")
    table = "sub-01/func/sub-01_task-rest_desc-moco_timeseries.tsv"
    fd = [0.0, 0.1, 0.7, 0.2, "n/a"]
    write_tsv_atomic([{"volume": t, "framewise_displacement_mm": fd[t], "mean_translation_x_mm": 0.1 * t,
                       "mean_translation_y_mm": -0.05 * t, "max_displacement_mm": 0.2 * t,
                       "translation_x_slice00_mm": 0.1 * t} for t in range(5)], tmp_path / table)
    sidecar = deriv.sidecar_of(mask_path)
    meta = json.loads(sidecar.read_text())
    meta["Outputs"] = {"motion": table}
    meta["Motion"] = {"FramewiseDisplacementMeanMM": 0.25, "FramewiseDisplacementMaxMM": 0.7,
                      "HighMotionVolumes": [2], "ThresholdMM": 0.5}
    meta["Metrics"]["confidence"] = 0.42
    write_json_atomic(meta, sidecar)
    html = qc.write_subject_page(tmp_path, "01").read_text()
    plot = re.search(r'<img class="fig" src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)"', html)
    svg = base64.b64decode(plot.group(1)).decode()
    assert svg.count("<polyline") == 3 and ">along x</text>" in svg and ">along y</text>" in svg
    assert svg.count('r="3" fill="#ff3030"') == 1                        # volume 2, above 0.5 mm
    assert "<dt>High-motion volumes</dt><dd>1 (FD &gt; 0.5 mm): 2</dd>" in html
    assert "<dt>Confidence</dt><dd>0.420 (0–1, higher = more certain)</dd>" in html
    data = embedded_data(qc.write_dataset_report(tmp_path).read_text())
    columns = {c["key"]: c for c in data["columns"]}
    assert columns["confidence"]["numeric"] and columns["fd_max_mm"]["numeric"]
    assert (data["runs"][0]["cells"]["confidence"], data["runs"][0]["cells"]["fd_max_mm"]) == (0.42, 0.7)
    assert "data:image/svg" not in (tmp_path / "qc" / "index.html").read_text()   # plotted on the subject page only


def test_legend_explains_every_code_and_tolerates_unknown_ones(tmp_path):
    write_run(tmp_path, "01", flags_extra=[{"code": "newer", "message": "from a later version", "slices": []}])
    html = qc.write_dataset_report(tmp_path).read_text().split('id="qc-data"')[0]
    for code in ("geometry", "timing", "empty", "gaps", "area", "components", "edge", "motion"):
        assert f'<dt><span class="chip">{code}</span></dt>' in html
    assert '<dt><span class="chip">newer</span></dt><dd>Flag of another episeg-bids version.</dd>' in html


def test_columns_with_one_value_for_every_run_are_named_above_the_table(tmp_path):
    write_run(tmp_path, "01")
    write_run(tmp_path, "02")
    data = embedded_data(qc.write_dataset_report(tmp_path).read_text())
    keys = [c["key"] for c in data["columns"] if c["table"]]
    assert "task" not in keys and {"label": "Task", "value": "rest"} in data["constant"]
    assert keys[:2] == ["subject", "flag_codes"]
