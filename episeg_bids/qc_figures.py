"""Figures of the QC report, from arrays only: axial mosaic, sagittal view, cord-area profile.

Every figure is an SVG string: the image is an 8-bit grey PNG (written here with ``zlib`` and
``struct``) embedded as base64, native voxels repeated by whole factors (nearest neighbour, no
interpolation); the mask is drawn as vector paths on the voxel edges (contour) and voxel runs
(fill), in the same coordinates, so the overlay cannot be misaligned. Labels are SVG text. The
same input gives the same bytes.

Display convention (as SCT's QC report): the volume is reoriented from its affine (never from the
on-disk order) to :data:`DISPLAY_AXCODES`, so axial tiles show **anterior up and the patient's
left on the viewer's left**, the first tile is the most superior slice, and each tile is numbered
with the slice's voxel index in the input file. The sagittal view shows superior up and anterior
on the left. An SVG shows the contour by default; ``#fill`` or ``#none`` after its URL (CSS
``:target``) switches to the fill or to the image alone, so pages can toggle an ``<img>``.
"""

from __future__ import annotations

import base64
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage

from .metrics import PLAUSIBLE_AREA_MM2

#: Display axes: slices superior → inferior, rows anterior → posterior, columns patient left → right.
DISPLAY_AXCODES = ("I", "P", "R")
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
COLOURS = {"mask": "#ff3030", "empty": "#ffb000", "flag": "#ff7a00", "letter": "#ffe14d",
           "ok": "#4c9be8", "range": "#d9f2d9"}
#: Overlay switch by URL fragment; the markers must precede the layers (sibling selector).
OVERLAY_STYLE = (".ov-fill{display:none}#fill:target~.ov-fill{display:inline}"
                 "#fill:target~.ov-contour,#none:target~.ov-contour{display:none}"
                 ".ov-contour{fill:none;stroke:%s;stroke-width:2;stroke-linecap:square}"
                 ".ov-fill{fill:%s;fill-opacity:.45}"
                 "text{font-family:%s;font-size:12px}"
                 ".lab{stroke:#000;stroke-width:3px;paint-order:stroke;stroke-linejoin:round}"
                 % (COLOURS["mask"], COLOURS["mask"], FONT))
OVERLAY_MARKERS = '<g id="fill"/><g id="none"/>'


@dataclass(frozen=True)
class DisplayVolume:
    """Image and mask reoriented for display (see :data:`DISPLAY_AXCODES`).

    ``image`` and ``mask`` are (S, R, C) arrays: slices superior → inferior, rows anterior →
    posterior, columns patient left → right. ``index[k]`` gives, for each position along display
    axis ``k``, the voxel index in the input file along its axis ``axes[k]``; ``zooms_mm`` are
    the voxel sizes along the display axes.
    """

    image: np.ndarray
    mask: np.ndarray
    index: tuple[np.ndarray, np.ndarray, np.ndarray]
    axes: tuple[int, int, int]
    zooms_mm: tuple[float, float, float]

    @property
    def slices(self) -> np.ndarray:
        """Voxel index in the input file of each displayed slice (superior first)."""
        return self.index[0]


@dataclass(frozen=True)
class Tile:
    """One axial tile: a fixed field of view around the cord of one slice.

    ``image`` (n_r, n_c) float (NaN outside the field of view), ``mask`` (n_r, n_c) bool,
    ``origin`` the display (row, column) of the top-left voxel, ``centre`` the display (row,
    column) the tile is centred on, ``has_cord`` whether the slice has mask voxels, ``outside``
    how many of them fall outside the tile.
    """

    slice: int
    image: np.ndarray
    mask: np.ndarray
    origin: tuple[int, int]
    centre: tuple[float, float]
    has_cord: bool
    outside: int


def _check_arrays(image: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> None:
    if np.ndim(image) != 3 or np.shape(image) != np.shape(mask):
        raise ValueError(f"image shape {np.shape(image)} and mask shape {np.shape(mask)} must be the same 3D "
                         "shape; pass the (X, Y, Z) volume that was segmented (the mean of a 4D run)")
    if np.shape(affine) != (4, 4):
        raise ValueError(f"affine must be (4, 4), got {np.shape(affine)}")


def to_display(image: np.ndarray, mask: np.ndarray, affine: np.ndarray,
               zooms_mm: tuple[float, float, float]) -> DisplayVolume:
    """Reorient ``image`` and ``mask`` to the display axes, from the affine.

    Parameters
    ----------
    image, mask : (X, Y, Z) ndarray
        Segmented volume and its mask, on-disk voxel order.
    affine : (4, 4) ndarray
        Voxel → scanner RAS+ mm.
    zooms_mm : (3,) tuple of float
        Voxel size along X, Y, Z.

    Returns
    -------
    DisplayVolume
        (S, R, C) arrays; the volume's closest axes are permuted and flipped, never resampled.

    Examples
    --------
    >>> vol = to_display(np.arange(8.).reshape(2, 2, 2), np.ones((2, 2, 2)), np.eye(4), (1, 1, 1))
    >>> vol.slices.tolist(), vol.axes        # RAS: the last voxel along Z is the most superior
    ([1, 0], (2, 1, 0))
    """
    _check_arrays(image, mask, affine)
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(DISPLAY_AXCODES))
    axes = [0, 0, 0]
    zooms = [0.0, 0.0, 0.0]
    index = [np.empty(0, int)] * 3
    for source, (target, flip) in enumerate(transform.astype(int)):
        axes[target] = source
        zooms[target] = float(zooms_mm[source])
        positions = np.arange(np.shape(image)[source])
        index[target] = positions[::-1] if flip < 0 else positions
    data = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return DisplayVolume(apply_orientation(data, transform), apply_orientation(np.asarray(mask) > 0, transform),
                         tuple(index), tuple(axes), tuple(zooms))


def tile_centres(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre (row, column) of each slice's tile and whether the slice has cord.

    A slice with cord is centred on the centroid of its largest island of mask voxels
    (8-connected; the mask centroid when there is one island, so stray voxels do not pull the cord
    out of view); a slice without cord on the centre of
    the nearest slice with cord (the more superior one on a tie), so it is shown, not hidden;
    with no cord at all, on the middle of the slice.

    Parameters
    ----------
    mask : (S, R, C) bool ndarray
        Display-oriented mask.

    Returns
    -------
    centres : (S, 2) float ndarray
    covered : (S,) bool ndarray
    """
    n_slices, n_rows, n_cols = mask.shape
    covered = mask.reshape(n_slices, -1).any(axis=1)
    centres = np.tile([(n_rows - 1) / 2, (n_cols - 1) / 2], (n_slices, 1))
    for s in np.flatnonzero(covered):
        labels, n = ndimage.label(mask[s], structure=np.ones((3, 3)))
        largest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:])) if n > 1 else 1
        centres[s] = np.argwhere(labels == largest).mean(axis=0)
    if covered.any():
        with_cord = np.flatnonzero(covered)
        for s in np.flatnonzero(~covered):
            centres[s] = centres[with_cord[np.argmin(np.abs(with_cord - s))]]
    return centres, covered


def tile_size(zooms_mm: tuple[float, float], fov_mm: float) -> tuple[int, int]:
    """Voxels across a ``fov_mm`` field of view, for rows and columns of voxel size ``zooms_mm``."""
    return tuple(max(1, int(math.ceil(fov_mm / z - 1e-6))) for z in zooms_mm)


def axial_tiles(volume: DisplayVolume, *, fov_mm: float = 30.0) -> list[Tile]:
    """One :class:`Tile` per slice, superior first, ``fov_mm`` × ``fov_mm`` around the cord.

    Voxels of the crop outside the image are NaN in ``Tile.image`` and False in ``Tile.mask``.
    """
    n_r, n_c = tile_size(volume.zooms_mm[1:], fov_mm)
    centres, covered = tile_centres(volume.mask)
    _, rows, cols = volume.image.shape
    tiles = []
    for s, (cr, cc) in enumerate(centres):
        r0, c0 = int(math.floor(cr + 0.5)) - n_r // 2, int(math.floor(cc + 0.5)) - n_c // 2
        image = np.full((n_r, n_c), np.nan)
        mask = np.zeros((n_r, n_c), bool)
        src_r, src_c = slice(max(r0, 0), min(r0 + n_r, rows)), slice(max(c0, 0), min(c0 + n_c, cols))
        dst_r, dst_c = slice(src_r.start - r0, src_r.stop - r0), slice(src_c.start - c0, src_c.stop - c0)
        if src_r.stop > src_r.start and src_c.stop > src_c.start:
            image[dst_r, dst_c] = volume.image[s, src_r, src_c]
            mask[dst_r, dst_c] = volume.mask[s, src_r, src_c]
        outside = int(volume.mask[s].sum() - mask.sum())
        tiles.append(Tile(int(volume.slices[s]), image, mask, (r0, c0), (float(cr), float(cc)),
                          bool(covered[s]), outside))
    return tiles


def display_window(values: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple[float, float]:
    """Robust grey-level window: the given percentiles of the finite ``values``."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(finite, percentiles))
    return (low, high) if high > low else (low, low + 1.0)


def to_grey(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """uint8 grey levels of ``values`` in ``window`` (NaN → 0)."""
    low, high = window
    scaled = (np.nan_to_num(values, nan=low) - low) / (high - low) * 255.0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def whole_factors(zooms_mm: tuple[float, float], target_px: int, n_voxels: tuple[int, int],
                  max_px: int | None = None) -> tuple[int, int]:
    """Whole repeat factors (rows, columns) so pixels are about square and the larger side is
    about ``target_px`` (at most ``max_px`` wide when given).

    Examples
    --------
    >>> whole_factors((5.0, 1.0), 240, (24, 80))    # 5 mm slices, 1 mm columns: 120 → 240 rows
    (10, 2)
    """
    base = min(zooms_mm)
    fr, fc = (max(1, int(round(z / base))) for z in zooms_mm)
    zoom = max(1, int(round(target_px / max(n_voxels[0] * fr, n_voxels[1] * fc))))
    if max_px is not None:
        zoom = max(1, min(zoom, max_px // (n_voxels[1] * fc)))
    return fr * zoom, fc * zoom


def png_bytes(grey: np.ndarray) -> bytes:
    """8-bit greyscale PNG of a (H, W) uint8 array (filter "Up" on every row; deterministic)."""
    grey = np.ascontiguousarray(grey, dtype=np.uint8)
    if grey.ndim != 2 or 0 in grey.shape:
        raise ValueError(f"expected a non-empty (H, W) array, got shape {grey.shape}")
    height, width = grey.shape
    up = np.diff(grey.astype(np.int16), axis=0, prepend=0).astype(np.uint8)
    raw = np.hstack([np.full((height, 1), 2, np.uint8), up]).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


def _runs(line: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of the runs of True in a 1D bool array."""
    edges = np.diff(np.concatenate([[0], line.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def contour_path(mask: np.ndarray, x0: int, y0: int, sx: int, sy: int) -> str:
    """SVG path along the voxel edges between mask and background of a (rows, cols) mask whose
    voxel (r, c) covers ``[x0 + c sx, x0 + (c+1) sx] × [y0 + r sy, y0 + (r+1) sy]``."""
    padded = np.pad(np.asarray(mask, bool), 1)
    parts = []
    horizontal = padded[1:, 1:-1] != padded[:-1, 1:-1]          # edge above row r
    for r, line in enumerate(horizontal):
        parts += [f"M{x0 + a * sx} {y0 + r * sy}H{x0 + b * sx}" for a, b in _runs(line)]
    vertical = padded[1:-1, 1:] != padded[1:-1, :-1]            # edge left of column c
    for c, line in enumerate(vertical.T):
        parts += [f"M{x0 + c * sx} {y0 + a * sy}V{y0 + b * sy}" for a, b in _runs(line)]
    return "".join(parts)


def fill_path(mask: np.ndarray, x0: int, y0: int, sx: int, sy: int) -> str:
    """SVG path of rectangles covering the mask voxels, one per run along a row."""
    return "".join(f"M{x0 + a * sx} {y0 + r * sy}h{(b - a) * sx}v{sy}h{-(b - a) * sx}z"
                   for r, line in enumerate(np.asarray(mask, bool)) for a, b in _runs(line))


def _text(x: float, y: float, content: str, *, anchor: str = "start", colour: str = "#fff",
          size: int | None = None, css: str = "lab") -> str:
    style = f' font-size="{size}"' if size else ""
    return (f'<text class="{css}" x="{x:g}" y="{y:g}" text-anchor="{anchor}" fill="{colour}"{style}>'
            f"{content}</text>")


def _svg(width: int, height: int, title: str, body: list[str], *, style: str = OVERLAY_STYLE) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
            f"<title>{title}</title><style>{style}</style>" + "".join(body) + "</svg>\n")


def _png_image(grey: np.ndarray, x: int = 0, y: int = 0) -> str:
    data = base64.b64encode(png_bytes(grey)).decode("ascii")
    return (f'<image x="{x}" y="{y}" width="{grey.shape[1]}" height="{grey.shape[0]}" '
            f'style="image-rendering:pixelated" xlink:href="data:image/png;base64,{data}"/>')


def _flag_codes_by_slice(flags: list[dict[str, Any]] | None) -> dict[int, list[str]]:
    codes: dict[int, list[str]] = {}
    for item in flags or []:
        for s in item.get("slices") or []:
            codes.setdefault(int(s), []).append(str(item.get("code", "")))
    return codes


def _area_by_slice(rows: list[dict[str, Any]]) -> dict[int, float | None]:
    return {int(r["slice"]): (float(r["area_mm2"]) if r.get("voxels") else None) for r in rows}


def mosaic_svg(volume: DisplayVolume, rows: list[dict[str, Any]], flags: list[dict[str, Any]] | None = None, *,
               fov_mm: float = 30.0, tile_px: int = 128, columns: int = 6, gap: int = 4, caption: int = 15) -> str:
    """Axial mosaic: one tile per slice, superior first, ``columns`` tiles per row.

    Each tile is a ``fov_mm`` square around the slice's cord (see :func:`axial_tiles`),
    grey levels from the 0.5-99.5 percentiles of all tiles; labels: slice number (voxel index in
    the input file), area in mm² (from ``rows``), "no cord" on empty slices (amber dashed
    frame), flag codes of the slice (orange frame), voxels of the mask outside the tile, and the
    orientation letters on the first tile. Under each tile, a caption strip: the slice's area and
    "+N out" when N mask voxels of the slice fall outside the tile.
    """
    tiles = axial_tiles(volume, fov_mm=fov_mm)
    n_r, n_c = tiles[0].image.shape
    sy, sx = whole_factors(volume.zooms_mm[1:], tile_px, (n_r, n_c))
    tile_h, tile_w = n_r * sy, n_c * sx
    n_cols = max(1, min(columns, len(tiles)))
    n_rows = -(-len(tiles) // n_cols)
    cell_h = tile_h + caption
    width, height = gap + n_cols * (tile_w + gap), gap + n_rows * (cell_h + gap)
    window = display_window(np.concatenate([t.image.ravel() for t in tiles]))
    canvas = np.zeros((height, width), np.uint8)
    areas, codes = _area_by_slice(rows), _flag_codes_by_slice(flags)
    outside_fov, contour, fill, labels = [], [], [], []
    for i, tile in enumerate(tiles):
        x, y = gap + (i % n_cols) * (tile_w + gap), gap + (i // n_cols) * (cell_h + gap)
        canvas[y:y + tile_h, x:x + tile_w] = np.repeat(np.repeat(to_grey(tile.image, window), sy, 0), sx, 1)
        outside_fov.append(fill_path(np.isnan(tile.image), x, y, sx, sy))
        contour.append(contour_path(tile.mask, x, y, sx, sy))
        fill.append(fill_path(tile.mask, x, y, sx, sy))
        labels.append(_text(x + 4, y + 14, str(tile.slice)))
        area = areas.get(tile.slice)
        if area is not None:
            labels.append(_text(x + 2, y + cell_h - 3, f"{area:.0f} mm²", colour="#ddd", css="num", size=11))
        if not tile.has_cord:
            labels.append(f'<rect x="{x + 1}" y="{y + 1}" width="{tile_w - 2}" height="{tile_h - 2}" fill="none" '
                          f'stroke="{COLOURS["empty"]}" stroke-width="2" stroke-dasharray="6 4"/>')
            labels.append(_text(x + tile_w / 2, y + tile_h / 2 + 4, "no cord", anchor="middle",
                                colour=COLOURS["empty"]))
        elif tile.slice in codes:
            labels.append(f'<rect x="{x + 1}" y="{y + 1}" width="{tile_w - 2}" height="{tile_h - 2}" fill="none" '
                          f'stroke="{COLOURS["flag"]}" stroke-width="2"/>')
        if tile.slice in codes:
            labels.append(_text(x + tile_w - 4, y + 14, " ".join(codes[tile.slice]), anchor="end",
                                colour=COLOURS["flag"], size=11))
        if tile.outside:
            labels.append(_text(x + tile_w - 2, y + cell_h - 3, f"+{tile.outside} out", anchor="end",
                                colour=COLOURS["empty"], css="num", size=10))
    if tiles:
        x, y = gap, gap
        for letter, lx, ly, anchor in (("A", tile_w / 2, 14, "middle"), ("P", tile_w / 2, tile_h - 5, "middle"),
                                       ("L", 4, tile_h / 2 + 4, "start"), ("R", tile_w - 4, tile_h / 2 + 4, "end")):
            labels.append(_text(x + lx, y + ly, letter, anchor=anchor, colour=COLOURS["letter"], size=13))
    title = (f"Axial mosaic, {len(tiles)} slices superior first; anterior up, patient left on the left; "
             f"{fov_mm:g} mm field of view")
    body = [f'<rect width="{width}" height="{height}" fill="#000"/>', _png_image(canvas),
            f'<path d="{"".join(outside_fov)}" fill="#2b3a55" fill-opacity=".6"/>', OVERLAY_MARKERS,
            f'<path class="ov-fill" d="{"".join(fill)}"/>', f'<path class="ov-contour" d="{"".join(contour)}"/>',
            "<g>", *labels, "</g>"]
    return _svg(width, height, title, body)


@dataclass(frozen=True)
class ProfileLayout:
    """Vertical layout shared by the sagittal view and the area profile, so that each slice's
    row of the sagittal image lines up with its bar: slice ``i`` (display order) spans
    ``top + i * slice_px`` to ``top + (i + 1) * slice_px``."""

    top: int
    slice_px: int
    n_slices: int
    bottom: int

    @property
    def height(self) -> int:
        return self.top + self.n_slices * self.slice_px + self.bottom


def sagittal_plane(volume: DisplayVolume, *, fov_mm: float = 80.0) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The sagittal plane through the mask's median left-right position.

    Returns
    -------
    image, mask : (S, n) ndarrays
        Slices superior first, ``n`` rows of the display (anterior first), at most ``fov_mm``
        around the mask's median anterior-posterior position.
    column : int
        Display column of the plane (the middle column when the mask is empty).
    row0 : int
        Display row of the first anterior-posterior position shown.
    """
    _, n_rows, n_cols = volume.mask.shape
    voxels = np.argwhere(volume.mask)
    column = int(math.floor(np.median(voxels[:, 2]) + 0.5)) if len(voxels) else n_cols // 2
    middle = float(np.median(voxels[:, 1])) if len(voxels) else (n_rows - 1) / 2
    n = min(n_rows, tile_size((volume.zooms_mm[1],), fov_mm)[0])
    row0 = int(np.clip(math.floor(middle + 0.5) - n // 2, 0, n_rows - n))
    return (volume.image[:, row0:row0 + n, column], volume.mask[:, row0:row0 + n, column], column, row0)


def sagittal_svg(volume: DisplayVolume, flags: list[dict[str, Any]] | None = None, *, fov_mm: float = 80.0,
                 target_px: int = 320, max_width_px: int = 320) -> tuple[str, ProfileLayout]:
    """Sagittal view through the cord with the mask, superior up, anterior on the left; slice
    thickness respected by whole-factor row repeats. Slice numbers on the left (voxel index in
    the input file), amber ticks on slices without cord, orange ticks on flagged slices.

    Returns the SVG and the :class:`ProfileLayout` to give :func:`area_svg`.
    """
    image, mask, column, _ = sagittal_plane(volume, fov_mm=fov_mm)
    n_s, n_ap = image.shape
    sy, sx = whole_factors((volume.zooms_mm[0], volume.zooms_mm[1]), target_px, (n_s, n_ap), max_px=max_width_px)
    layout = ProfileLayout(top=20, slice_px=sy, n_slices=n_s, bottom=34)
    left = 40
    width = left + n_ap * sx + 12
    grey = np.repeat(np.repeat(to_grey(image, display_window(image)), sy, 0), sx, 1)
    codes = _flag_codes_by_slice(flags)
    covered = volume.mask.reshape(n_s, -1).any(axis=1)
    step = max(1, math.ceil(13 / sy))
    labels, ticks = [], []
    for i, s in enumerate(volume.slices.tolist()):
        y = layout.top + i * sy
        if i % step == 0:
            labels.append(_text(left - 6, y + sy / 2 + 4, str(s), anchor="end", colour="#222", css="num", size=11))
        colour = COLOURS["empty"] if not covered[i] else COLOURS["flag"] if s in codes else None
        if colour:
            ticks.append(f'<rect x="{left - 4}" y="{y}" width="4" height="{sy}" fill="{colour}"/>')
    x_mid = left + n_ap * sx / 2
    plane = f"plane: voxel {int(volume.index[2][column])} of axis {volume.axes[2]} (left-right)"
    labels += [_text(x_mid, 14, "S", anchor="middle", colour="#222", css="num", size=13),
               _text(x_mid, layout.height - 20, "I", anchor="middle", colour="#222", css="num", size=13),
               _text(left + 4, layout.top + 14, "A", colour=COLOURS["letter"], size=13),
               _text(left + n_ap * sx - 4, layout.top + 14, "P", anchor="end", colour=COLOURS["letter"], size=13),
               _text(4, layout.height - 5, plane, colour="#555", css="num", size=10)]
    body = [f'<rect width="{width}" height="{layout.height}" fill="#fff"/>', _png_image(grey, left, layout.top),
            OVERLAY_MARKERS, f'<path class="ov-fill" d="{fill_path(mask, left, layout.top, sx, sy)}"/>',
            f'<path class="ov-contour" d="{contour_path(mask, left, layout.top, sx, sy)}"/>', *ticks, *labels]
    title = "Sagittal view through the cord: superior up, anterior on the left"
    return _svg(width, layout.height, title, body), layout


def area_svg(rows: list[dict[str, Any]], slices: np.ndarray, layout: ProfileLayout, *, width: int = 230,
             plausible_mm2: tuple[float, float] = PLAUSIBLE_AREA_MM2) -> str:
    """Cord area per slice as horizontal bars, one per slice in display order (``slices``,
    superior first) at the heights of ``layout`` (aligned with :func:`sagittal_svg`); the
    plausible range is shaded, bars outside it are orange, slices without cord say so."""
    areas = _area_by_slice(rows)
    left, right = 8, width - 44
    present = [a for a in areas.values() if a is not None]
    top_value = max([plausible_mm2[1] * 1.1, *(a * 1.05 for a in present)])

    def x(value: float) -> float:
        return round(left + (right - left) * value / top_value, 2)

    plot_h = layout.n_slices * layout.slice_px
    body = [f'<rect width="{width}" height="{layout.height}" fill="#fff"/>',
            f'<rect x="{x(plausible_mm2[0])}" y="{layout.top}" width="{x(plausible_mm2[1]) - x(plausible_mm2[0]):g}" '
            f'height="{plot_h}" fill="{COLOURS["range"]}"/>',
            _text(left, 14, "cord area (mm²)", colour="#222", css="num", size=11)]
    size = min(11, layout.slice_px - 1)
    for i, s in enumerate(slices.tolist()):
        y, area = layout.top + i * layout.slice_px, areas.get(int(s))
        bar_h = max(1, layout.slice_px - 2 if layout.slice_px > 4 else layout.slice_px)
        if area is None:
            if size >= 8:
                body.append(_text(left + 2, y + layout.slice_px / 2 + size / 2 - 1, "no cord", colour="#b07800",
                                  css="num", size=size))
            continue
        ok = plausible_mm2[0] <= area <= plausible_mm2[1]
        body.append(f'<rect x="{left}" y="{y + (layout.slice_px - bar_h) / 2:g}" width="{x(area) - left:g}" '
                    f'height="{bar_h}" fill="{COLOURS["ok"] if ok else COLOURS["flag"]}"/>')
        if size >= 8:
            body.append(_text(x(area) + 3, y + layout.slice_px / 2 + size / 2 - 1, f"{area:.0f}", colour="#222",
                              css="num", size=size))
    axis_y = layout.top + plot_h
    body.append(f'<path d="M{left} {layout.top}V{axis_y}H{right}" fill="none" stroke="#444"/>')
    for value in range(0, int(top_value) + 1, 50):
        body.append(f'<path d="M{x(value)} {axis_y}v4" stroke="#444"/>')
        body.append(_text(x(value), axis_y + 15, str(value), anchor="middle", colour="#222", css="num", size=10))
    return _svg(width, layout.height, "Cord cross-sectional area per slice (mm²), superior first", body,
                style=f"text{{font-family:{FONT}}}")


def run_figures(image: np.ndarray, mask: np.ndarray, affine: np.ndarray, zooms_mm: tuple[float, float, float],
                rows: list[dict[str, Any]], flags: list[dict[str, Any]] | None = None) -> dict[str, str]:
    """The three SVG figures of one run: ``{'mosaic', 'sagittal', 'area'}`` → SVG text."""
    volume = to_display(image, mask, affine, zooms_mm)
    sagittal, layout = sagittal_svg(volume, flags)
    return {"mosaic": mosaic_svg(volume, rows, flags), "sagittal": sagittal,
            "area": area_svg(rows, volume.slices, layout)}
