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
on the left.

Colours: the main (largest) component of the mask in red, its other components in magenta (the
ones a reviewer should look at, :data:`episeg_bids.metrics.COMPONENT_MIN_VOXELS`, ringed in
orange with their number), the manual (reference) mask, when there is one, as a dashed cyan
contour over ours (an edge both share shows alternating cyan and red dashes).

Views are switched by the URL fragment (CSS ``:target``), so pages toggle an ``<img>``: the
fragment is ``<overlay>[-full][-noref]`` with overlay ``contour`` (the default), ``fill`` or
``none`` (our mask hidden); ``-full`` shows the mosaic's whole-field-of-view tiles instead of the
30 mm tiles around the cord (every component in view); ``-noref`` hides the reference contour.
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

from .accuracy import per_slice_dice
from .metrics import PLAUSIBLE_AREA_MM2, describe_components, label_components, slice_axis

#: Display axes: slices superior → inferior, rows anterior → posterior, columns patient left → right.
DISPLAY_AXCODES = ("I", "P", "R")
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
COLOURS = {"mask": "#ff3030", "other": "#ff40ff", "reference": "#00e5ff", "empty": "#ffb000", "flag": "#ff7a00",
           "letter": "#ffe14d", "ok": "#4c9be8", "range": "#d9f2d9"}
#: Fragments a figure understands (see the module docstring); the markers precede the layers
#: (the CSS uses the sibling selector).
FRAGMENTS = tuple(o + v + r for o in ("contour", "fill", "none") for v in ("", "-full") for r in ("", "-noref"))
OVERLAY_MARKERS = "".join(f'<g id="{name}"/>' for name in FRAGMENTS)
OVERLAY_STYLE = (
    ".ov-fill,.v-full{display:none}"
    "[id^=fill]:target~g .ov-fill{display:inline}"
    "[id^=fill]:target~g .ov-contour,[id^=none]:target~g .ov{display:none}"
    "[id*=-full]:target~.v-cord{display:none}[id*=-full]:target~.v-full{display:inline}"
    "[id$=-noref]:target~g .ref{display:none}"
    ".ov-contour{fill:none;stroke-width:2;stroke-linecap:square}"
    ".ov-contour.main{stroke:%(mask)s}.ov-contour.other{stroke:%(other)s}"
    ".ov-fill{fill-opacity:.45}.ov-fill.main{fill:%(mask)s}.ov-fill.other{fill:%(other)s}"
    ".ref{fill:none;stroke:%(reference)s;stroke-width:2;stroke-dasharray:3 3}"
    ".ring{fill:none;stroke:%(other)s;stroke-width:1.5}.ring.flagged{stroke:%(flag)s;stroke-width:2.5}"
    ".v-full path,.v-full rect{vector-effect:non-scaling-stroke}"
    ".crop{fill:none;stroke:%(letter)s;stroke-width:1;stroke-dasharray:3 3}"
    "text{font-family:%(font)s;font-size:12px}"
    ".lab{stroke:#000;stroke-width:3px;paint-order:stroke;stroke-linejoin:round}"
    % {**COLOURS, "font": FONT})


@dataclass(frozen=True)
class DisplayVolume:
    """Image and mask reoriented for display (see :data:`DISPLAY_AXCODES`).

    ``image`` and ``mask`` are (S, R, C) arrays: slices superior → inferior, rows anterior →
    posterior, columns patient left → right. ``index[k]`` gives, for each position along display
    axis ``k``, the voxel index in the input file along its axis ``axes[k]``; ``zooms_mm`` are
    the voxel sizes along the display axes. ``labels`` (S, R, C) int numbers the mask's
    components as :func:`episeg_bids.metrics.label_components` (1 = main; None: every mask voxel
    is the main component); ``reference`` (S, R, C) bool is the manual mask, or None.
    """

    image: np.ndarray
    mask: np.ndarray
    index: tuple[np.ndarray, np.ndarray, np.ndarray]
    axes: tuple[int, int, int]
    zooms_mm: tuple[float, float, float]
    labels: np.ndarray | None = None
    reference: np.ndarray | None = None

    @property
    def slices(self) -> np.ndarray:
        """Voxel index in the input file of each displayed slice (superior first)."""
        return self.index[0]

    @property
    def component_labels(self) -> np.ndarray:
        """``labels``, or the mask as component 1 when there are none."""
        return self.labels if self.labels is not None else self.mask.astype(np.int32)


@dataclass(frozen=True)
class Tile:
    """One axial tile: a fixed field of view around the cord of one slice.

    ``image`` (n_r, n_c) float (NaN outside the field of view), ``mask`` (n_r, n_c) bool,
    ``origin`` the display (row, column) of the top-left voxel, ``centre`` the display (row,
    column) the tile is centred on, ``has_cord`` whether the slice has mask voxels, ``outside``
    how many of them fall outside the tile; ``labels`` and ``reference`` the crops of
    :class:`DisplayVolume`'s (0 / False outside the image; ``reference`` None without one).
    """

    slice: int
    image: np.ndarray
    mask: np.ndarray
    origin: tuple[int, int]
    centre: tuple[float, float]
    has_cord: bool
    outside: int
    labels: np.ndarray | None = None
    reference: np.ndarray | None = None


def _check_arrays(image: np.ndarray, mask: np.ndarray, affine: np.ndarray,
                  reference: np.ndarray | None = None) -> None:
    if np.ndim(image) != 3 or np.shape(image) != np.shape(mask):
        raise ValueError(f"image shape {np.shape(image)} and mask shape {np.shape(mask)} must be the same 3D "
                         "shape; pass the (X, Y, Z) volume that was segmented (the mean of a 4D run)")
    if reference is not None and np.shape(reference) != np.shape(mask):
        raise ValueError(f"reference mask shape {np.shape(reference)} differs from the mask's {np.shape(mask)}; "
                         "resample the manual mask to the input image's grid")
    if np.shape(affine) != (4, 4):
        raise ValueError(f"affine must be (4, 4), got {np.shape(affine)}")


def to_display(image: np.ndarray, mask: np.ndarray, affine: np.ndarray, zooms_mm: tuple[float, float, float], *,
               labels: np.ndarray | None = None, reference: np.ndarray | None = None) -> DisplayVolume:
    """Reorient ``image`` and ``mask`` (and the component labels, the reference) to the display
    axes, from the affine.

    Parameters
    ----------
    image, mask : (X, Y, Z) ndarray
        Segmented volume and its mask, on-disk voxel order.
    affine : (4, 4) ndarray
        Voxel → scanner RAS+ mm.
    zooms_mm : (3,) tuple of float
        Voxel size along X, Y, Z.
    labels : (X, Y, Z) int ndarray, optional
        :func:`episeg_bids.metrics.label_components` of the mask (computed when not given).
    reference : (X, Y, Z) ndarray, optional
        A manual mask on the same grid.

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
    _check_arrays(image, mask, affine, reference)
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
    labels = label_components(mask)[0] if labels is None else np.asarray(labels)
    return DisplayVolume(apply_orientation(data, transform), apply_orientation(np.asarray(mask) > 0, transform),
                         tuple(index), tuple(axes), tuple(zooms), apply_orientation(labels, transform).astype(np.int32),
                         None if reference is None else apply_orientation(np.asarray(reference) > 0, transform))


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


def _crop(plane: np.ndarray, r0: int, c0: int, n_r: int, n_c: int, fill: Any) -> np.ndarray:
    """The (n_r, n_c) window of a 2D ``plane`` whose top-left voxel is (r0, c0); ``fill`` outside."""
    out = np.full((n_r, n_c), fill, dtype=np.result_type(plane.dtype, np.asarray(fill).dtype))
    rows, cols = plane.shape
    src_r, src_c = slice(max(r0, 0), min(r0 + n_r, rows)), slice(max(c0, 0), min(c0 + n_c, cols))
    if src_r.stop > src_r.start and src_c.stop > src_c.start:
        out[src_r.start - r0:src_r.stop - r0, src_c.start - c0:src_c.stop - c0] = plane[src_r, src_c]
    return out


def axial_tiles(volume: DisplayVolume, *, fov_mm: float = 30.0) -> list[Tile]:
    """One :class:`Tile` per slice, superior first, ``fov_mm`` × ``fov_mm`` around the cord.

    Voxels of the crop outside the image are NaN in ``Tile.image`` and False in ``Tile.mask``.
    """
    n_r, n_c = tile_size(volume.zooms_mm[1:], fov_mm)
    centres, covered = tile_centres(volume.mask)
    labels = volume.component_labels
    tiles = []
    for s, (cr, cc) in enumerate(centres):
        r0, c0 = int(math.floor(cr + 0.5)) - n_r // 2, int(math.floor(cc + 0.5)) - n_c // 2
        mask = _crop(volume.mask[s], r0, c0, n_r, n_c, False)
        reference = None if volume.reference is None else _crop(volume.reference[s], r0, c0, n_r, n_c, False)
        outside = int(volume.mask[s].sum() - mask.sum())
        tiles.append(Tile(int(volume.slices[s]), _crop(volume.image[s], r0, c0, n_r, n_c, np.nan), mask, (r0, c0),
                          (float(cr), float(cc)), bool(covered[s]), outside, _crop(labels[s], r0, c0, n_r, n_c, 0),
                          reference))
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
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b""))


def _row_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The runs of True along the rows of a 2D bool array, in row-major order: their row, start
    column and stop column (exclusive), as int arrays (one NumPy pass for the whole array, so a
    mask of thousands of pieces costs no Python loop over rows)."""
    edges = np.diff(np.pad(np.asarray(mask, bool), ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, stops = np.nonzero(edges == -1)        # the k-th stop closes the k-th start (row-major)
    return rows, starts, stops


def _repeat_format(template: str, *columns: np.ndarray) -> str:
    """``template`` %-formatted with the k-th value of every column, for each k, concatenated.

    The values become Python numbers first (``tolist``), so ``%s`` prints them exactly as an
    f-string would (``3``, ``2.5``); one format call covers every run of a mask, so a failed
    model's thousands of pieces cost no Python loop."""
    table = np.empty((len(columns[0]), len(columns)), dtype=object)
    for j, column in enumerate(columns):
        table[:, j] = column.tolist()
    return (template * table.shape[0]) % tuple(table.ravel().tolist())


def contour_path(mask: np.ndarray, x0: int, y0: int, sx: int, sy: int) -> str:
    """SVG path along the voxel edges between mask and background of a (rows, cols) mask whose
    voxel (r, c) covers ``[x0 + c sx, x0 + (c+1) sx] × [y0 + r sy, y0 + (r+1) sy]``."""
    padded = np.pad(np.asarray(mask, bool), 1)
    horizontal = padded[1:, 1:-1] != padded[:-1, 1:-1]          # edge above row r
    vertical = (padded[1:-1, 1:] != padded[1:-1, :-1]).T        # edge left of column c
    r, a, b = _row_runs(horizontal)
    c, top, bottom = _row_runs(vertical)
    return (_repeat_format("M%s %sH%s", x0 + a * sx, y0 + r * sy, x0 + b * sx)
            + _repeat_format("M%s %sV%s", x0 + c * sx, y0 + top * sy, y0 + bottom * sy))


def fill_path(mask: np.ndarray, x0: int, y0: int, sx: int, sy: int) -> str:
    """SVG path of rectangles covering the mask voxels, one per run along a row."""
    r, a, b = _row_runs(mask)
    width = (b - a) * sx
    return _repeat_format("M%s %sh%sv%sh%sz", x0 + a * sx, y0 + r * sy, width, np.full(len(r), sy), -width)


def _text(x: float, y: float, content: str, *, anchor: str = "start", colour: str = "#fff",
          size: int | None = None, css: str = "lab") -> str:
    style = f' font-size="{size}"' if size else ""
    return (f'<text class="{css}" x="{x:g}" y="{y:g}" text-anchor="{anchor}" fill="{colour}"{style}>'
            f"{content}</text>")


def _svg(width: int, height: int, title: str, body: list[str], *, style: str = OVERLAY_STYLE) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
            f"<title>{title}</title><style>{style}</style>" + "".join(body) + "</svg>\n")


def _png_image(grey: np.ndarray, x: float = 0, y: float = 0, *, width: float | None = None,
               height: float | None = None, ident: str = "") -> str:
    data = base64.b64encode(png_bytes(grey)).decode("ascii")
    size = (f'width="{grey.shape[1] if width is None else width:g}" '
            f'height="{grey.shape[0] if height is None else height:g}" preserveAspectRatio="none"')
    name = f' id="{ident}"' if ident else ""
    return (f'<image{name} x="{x:g}" y="{y:g}" {size} style="image-rendering:pixelated" '
            f'xlink:href="data:image/png;base64,{data}"/>')


def _flag_codes_by_slice(flags: list[dict[str, Any]] | None) -> dict[int, list[str]]:
    codes: dict[int, list[str]] = {}
    for item in flags or []:
        for s in item.get("slices") or []:
            codes.setdefault(int(s), []).append(str(item.get("code", "")))
    return codes


def _area_by_slice(rows: list[dict[str, Any]]) -> dict[int, float | None]:
    return {int(r["slice"]): (float(r["area_mm2"]) if r.get("voxels") else None) for r in rows}


def _mask_layers(labels: np.ndarray, reference: np.ndarray | None, x0: float, y0: float, sx: float,
                 sy: float) -> dict[str, str]:
    """Path data of one window: ``ref`` (reference contour), ``fill-main``, ``contour-main``,
    ``fill-other``, ``contour-other`` (our main component and the other ones)."""
    layers = {"ref": contour_path(reference, x0, y0, sx, sy) if reference is not None else ""}
    for part, where in (("main", labels == 1), ("other", labels > 1)):
        layers[f"fill-{part}"] = fill_path(where, x0, y0, sx, sy)
        layers[f"contour-{part}"] = contour_path(where, x0, y0, sx, sy)
    return layers


def _layer_elements(layers: dict[str, str]) -> list[str]:
    """SVG paths of :func:`_mask_layers` (joined over tiles): our mask, then the reference's
    dashed contour over it (where both share an edge, the dashes alternate cyan and red)."""
    ours = [f'<path class="ov-{kind} {part}" d="{layers[f"{kind}-{part}"]}"/>'
            for part in ("main", "other") for kind in ("fill", "contour") if layers.get(f"{kind}-{part}")]
    out = [f'<g class="ov">{"".join(ours)}</g>'] if ours else []
    return out + ([f'<path class="ref" d="{layers["ref"]}"/>'] if layers.get("ref") else [])


def _join(parts: list[dict[str, str]]) -> dict[str, str]:
    return {key: "".join(p.get(key, "") for p in parts) for key in {k for p in parts for k in p}}


def _slice_components(labels: np.ndarray) -> list[tuple[int, float, float, float]]:
    """Components other than the main one on a (R, C) slice: (id, centre row, centre column,
    half extent in voxels), in id order (array operations only: a failed model's thousands of
    pieces cost milliseconds)."""
    flat = labels.ravel()
    where = np.flatnonzero(flat > 1)
    if where.size == 0:
        return []
    ids, inverse = np.unique(flat[where], return_inverse=True)
    rows, cols = np.divmod(where, labels.shape[1])
    count = np.bincount(inverse)
    centre_r, centre_c = np.bincount(inverse, rows) / count, np.bincount(inverse, cols) / count
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(count)[:-1]])
    extent_r = np.maximum.reduceat(rows[order], starts) - np.minimum.reduceat(rows[order], starts) + 1
    extent_c = np.maximum.reduceat(cols[order], starts) - np.minimum.reduceat(cols[order], starts) + 1
    half = np.maximum(extent_r, extent_c) / 2
    return list(zip(ids.tolist(), centre_r.tolist(), centre_c.tolist(), half.tolist()))


def _ring(cx: float, cy: float, radius: float, ident: int, flagged: bool, *, label: bool) -> list[str]:
    out = [f'<circle class="ring{" flagged" if flagged else ""}" cx="{cx:.1f}" cy="{cy:.1f}" r="{radius:.1f}"/>']
    if label:
        out.append(_text(cx + radius * 0.75 + 1, cy - radius * 0.75 - 1, f"#{ident}",
                         colour=COLOURS["flag"] if flagged else COLOURS["other"], size=10))
    return out


def _caption(area: float | None, dice: dict[str, Any] | None, with_reference: bool, x: float, y: float,
             caption: int) -> list[str]:
    """Area (first line) and, with a reference, the slice's Dice (second line) under a tile."""
    out = []
    if area is not None:
        out.append(_text(x + 2, y + caption - 3, f"{area:.0f} mm²", colour="#ddd", css="num", size=11))
    if with_reference and dice is not None:
        text = "no manual mask" if not dice.get("voxels_truth") else f"Dice {dice['dice']:.2f}"
        out.append(_text(x + 2, y + 2 * caption - 3, text, colour=COLOURS["reference"], css="num", size=11))
    return out


def _whole_field_tile(volume: DisplayVolume, s: int, tile: Tile, box: tuple[float, float, float, float],
                      flagged: set[int]) -> list[str]:
    """The whole view of display slice ``s`` in the tile ``box`` (x, y, width, height in px): a
    viewport on the slice's rows of the ``#fov`` sprite, in voxel units, scaled to fit (so the
    mm aspect is kept), with our mask, the reference, the cord view's window and a ring around
    every component other than the main one (flagged ones orange and numbered)."""
    _, n_rows, n_cols = volume.image.shape
    zr, zc = volume.zooms_mm[1:]
    scale = min(box[2] / (n_cols * zc), box[3] / (n_rows * zr))         # px per mm
    width, height = n_cols * zc * scale, n_rows * zr * scale
    fx, fy = box[0] + (box[2] - width) / 2, box[1] + (box[3] - height) / 2
    labels = volume.component_labels[s]
    layers = _mask_layers(labels, None if volume.reference is None else volume.reference[s], 0, s * n_rows, 1, 1)
    (r0, c0), (n_r, n_c) = tile.origin, tile.image.shape
    out = [f'<svg x="{fx:.2f}" y="{fy:.2f}" width="{width:.2f}" height="{height:.2f}" '
           f'viewBox="0 {s * n_rows} {n_cols} {n_rows}" preserveAspectRatio="none"><use xlink:href="#fov"/>'
           + "".join(_layer_elements(layers))
           + f'<rect class="crop" x="{c0}" y="{s * n_rows + r0}" width="{n_c}" height="{n_r}"/></svg>']
    in_slice = _slice_components(labels)
    rings = [part for ident, cr, cc, half in in_slice
             for part in _ring(fx + (cc + 0.5) * zc * scale, fy + (cr + 0.5) * zr * scale,
                               max(6.0, half * max(zr, zc) * scale + 3), ident, ident in flagged,
                               label=ident in flagged or len(in_slice) <= 6)]
    return out + ([f'<g class="ov">{"".join(rings)}</g>'] if rings else [])


def _cord_rings(volume: DisplayVolume, s: int, tile: Tile, x: int, y: int, scale: tuple[int, int],
                flagged: set[int]) -> list[str]:
    """Orange numbered rings around the flagged components inside the cord view's tile."""
    (r0, c0), (n_r, n_c), (sy, sx) = tile.origin, tile.image.shape, scale
    return [part for ident, cr, cc, half in _slice_components(volume.component_labels[s])
            if ident in flagged and r0 <= cr < r0 + n_r and c0 <= cc < c0 + n_c
            for part in _ring(x + (cc - c0 + 0.5) * sx, y + (cr - r0 + 0.5) * sy, max(8.0, half * max(sx, sy) + 4),
                              ident, True, label=True)]


def _tile_labels(tile: Tile, x: int, y: int, tile_w: int, tile_h: int, codes: list[str] | None) -> list[str]:
    """Slice number; "no cord" and an amber dashed frame on an empty slice; the flag codes of
    the slice and an orange frame."""
    out = [_text(x + 4, y + 14, str(tile.slice))]
    frame = f'<rect x="{x + 1}" y="{y + 1}" width="{tile_w - 2}" height="{tile_h - 2}" fill="none" stroke-width="2" '
    if not tile.has_cord:
        out.append(frame + f'stroke="{COLOURS["empty"]}" stroke-dasharray="6 4"/>')
        out.append(_text(x + tile_w / 2, y + tile_h / 2 + 4, "no cord", anchor="middle", colour=COLOURS["empty"]))
    elif codes:
        out.append(frame + f'stroke="{COLOURS["flag"]}"/>')
    if codes:
        out.append(_text(x + tile_w - 4, y + 14, " ".join(dict.fromkeys(codes)), anchor="end", colour=COLOURS["flag"],
                         size=11))
    return out


def mosaic_svg(volume: DisplayVolume, rows: list[dict[str, Any]], flags: list[dict[str, Any]] | None = None, *,
               components: list[dict[str, Any]] | None = None, slice_dice: dict[int, dict[str, Any]] | None = None,
               fov_mm: float = 30.0, tile_px: int = 128, columns: int = 6, gap: int = 4, caption: int = 15) -> str:
    """Axial mosaic: one tile per slice, superior first, ``columns`` tiles per row, in two views.

    The cord view (default) shows a ``fov_mm`` square around the slice's cord (see
    :func:`axial_tiles`), grey levels from the 0.5-99.5 percentiles of all tiles; the whole view
    (fragment ``-full``) shows each slice's whole field of view in the same tile, scaled to fit
    (the browser repeats voxels, no interpolation; 32 grey levels), with the cord view's window
    as a dashed yellow frame and every component other than the main one ringed. Labels: slice
    number (voxel index in the input file), "no cord" on empty slices (amber dashed frame), flag
    codes of the slice (orange frame), orientation letters on the first tile; under each tile its
    area in mm² (from ``rows``), "+N out" in the cord view when N mask voxels of the slice fall
    outside the tile, and with a reference mask the slice's Dice (``slice_dice``: slice → row of
    :func:`episeg_bids.accuracy.per_slice_dice`).

    ``components`` (:func:`episeg_bids.metrics.describe_components` of the mask) says which
    components are flagged: they are ringed in orange and numbered.
    """
    tiles = axial_tiles(volume, fov_mm=fov_mm)
    n_r, n_c = tiles[0].image.shape
    sy, sx = whole_factors(volume.zooms_mm[1:], tile_px, (n_r, n_c))
    tile_h, tile_w = n_r * sy, n_c * sx
    with_reference = volume.reference is not None
    n_cols = max(1, min(columns, len(tiles)))
    cell_h = tile_h + caption * (2 if with_reference else 1)
    width, height = gap + n_cols * (tile_w + gap), gap + -(-len(tiles) // n_cols) * (cell_h + gap)
    window = display_window(np.concatenate([t.image.ravel() for t in tiles]))
    canvas = np.zeros((height, width), np.uint8)
    areas, codes = _area_by_slice(rows), _flag_codes_by_slice(flags)
    flagged = {int(c["id"]) for c in components or [] if c.get("flagged")}
    outside_fov, cord_layers, cord_marks, cord_notes, full, common = [], [], [], [], [], []
    for s, tile in enumerate(tiles):                                      # s: display slice index
        x, y = gap + (s % n_cols) * (tile_w + gap), gap + (s // n_cols) * (cell_h + gap)
        canvas[y:y + tile_h, x:x + tile_w] = np.repeat(np.repeat(to_grey(tile.image, window), sy, 0), sx, 1)
        outside_fov.append(fill_path(np.isnan(tile.image), x, y, sx, sy))
        cord_layers.append(_mask_layers(tile.labels, tile.reference, x, y, sx, sy))
        cord_marks += _cord_rings(volume, s, tile, x, y, (sy, sx), flagged)
        if tile.outside:
            cord_notes.append(_text(x + tile_w - 2, y + tile_h + caption - 3, f"+{tile.outside} out", anchor="end",
                                    colour=COLOURS["empty"], css="num", size=10))
        full += _whole_field_tile(volume, s, tile, (x, y, tile_w, tile_h), flagged)
        common += _tile_labels(tile, x, y, tile_w, tile_h, codes.get(tile.slice))
        common += _caption(areas.get(tile.slice), (slice_dice or {}).get(tile.slice), with_reference, x,
                           y + tile_h, caption)
    for letter, lx, ly, anchor in (("A", tile_w / 2, 14, "middle"), ("P", tile_w / 2, tile_h - 5, "middle"),
                                   ("L", 4, tile_h / 2 + 4, "start"), ("R", tile_w - 4, tile_h / 2 + 4, "end")):
        common.append(_text(gap + lx, gap + ly, letter, anchor=anchor, colour=COLOURS["letter"], size=13))
    # the whole view is for finding things: 32 grey levels halve the PNG of a noisy EPI
    sprite = to_grey(volume.image.reshape(-1, volume.image.shape[2]), display_window(volume.image)).astype(float)
    sprite = np.round(np.round(sprite * 31 / 255) * 255 / 31).astype(np.uint8)
    title = (f"Axial mosaic, {len(tiles)} slices superior first; anterior up, patient left on the left; "
             f"{fov_mm:g} mm field of view around the cord (#...-full: the whole field of view)")
    body = [f"<defs>{_png_image(sprite, ident='fov')}</defs>", f'<rect width="{width}" height="{height}" fill="#000"/>',
            OVERLAY_MARKERS,
            '<g class="v-cord">', _png_image(canvas),
            f'<path d="{"".join(outside_fov)}" fill="#2b3a55" fill-opacity=".6"/>',
            *_layer_elements(_join(cord_layers)), f'<g class="ov">{"".join(cord_marks)}</g>', *cord_notes, "</g>",
            '<g class="v-full">', *full, "</g>",
            "<g>", *common, "</g>"]
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
    the input file), amber ticks on slices without cord, orange ticks on flagged slices; the
    reference mask's contour, when the volume has one, under ours.

    Returns the SVG and the :class:`ProfileLayout` to give :func:`area_svg`.
    """
    image, _, column, row0 = sagittal_plane(volume, fov_mm=fov_mm)
    n_s, n_ap = image.shape
    reference = None if volume.reference is None else volume.reference[:, row0:row0 + n_ap, column]
    sy, sx = whole_factors((volume.zooms_mm[0], volume.zooms_mm[1]), target_px, (n_s, n_ap), max_px=max_width_px)
    layout = ProfileLayout(top=20, slice_px=sy, n_slices=n_s, bottom=34)
    left = 40
    width = left + n_ap * sx + 12
    overlay = _layer_elements(_mask_layers(volume.component_labels[:, row0:row0 + n_ap, column], reference, left,
                                           layout.top, sx, sy))
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
            OVERLAY_MARKERS, "<g>", *overlay, "</g>", *ticks, *labels]
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


def motion_svg(volumes: list[int], fd_mm: list[float | None], translations_mm: dict[str, list[float | None]], *,
               threshold_mm: float | None = None, width: int = 640, panel_h: int = 110) -> str:
    """Motion of a motion-corrected 4D run: framewise displacement per volume (threshold dashed,
    volumes above it marked) over the mean in-plane translations per volume.

    Parameters
    ----------
    volumes : list of int
        Volume indices (x axis).
    fd_mm : list of float or None
        Framewise displacement of each volume, in mm (None: not measured).
    translations_mm : dict
        Axis name (e.g. ``'x'``) → mean translation of each volume over its slices, in mm.
    threshold_mm : float, optional
        The high-motion threshold of the framewise displacement.
    """
    left, right, top, between = 46, 12, 18, 34
    plot_w = width - left - right
    height = top + 2 * panel_h + between + 26
    colours = ("#1f6feb", "#c25700", "#137333", "#6f42c1")
    n = max(len(volumes), 1)

    def x(i: int) -> float:
        return round(left + plot_w * (i + 0.5) / n, 2)

    def panel(y0: float, series: dict[str, list[float | None]], unit_label: str, floor: float | None,
              ceiling: float | None, marks: float | None) -> list[str]:
        values = [v for vs in series.values() for v in vs if v is not None]
        low = min([*values, 0.0] if floor is None else [floor])
        high = max([*values, 0.0, *([marks * 1.2] if marks else []), *([ceiling] if ceiling else [])])
        high = high if high > low else low + 1.0

        def y(v: float) -> float:
            return round(y0 + panel_h * (high - v) / (high - low), 2)

        out = [f'<rect x="{left}" y="{y0}" width="{plot_w}" height="{panel_h}" fill="#fff" stroke="#ccd"/>',
               _text(left - 4, y0 + 10, f"{high:.2g}", anchor="end", colour="#444", css="num", size=10),
               _text(left - 4, y0 + panel_h, f"{low:.2g}", anchor="end", colour="#444", css="num", size=10),
               _text(left + 4, y0 - 5, unit_label, colour="#222", css="num", size=11)]
        if low < 0 < high:
            out.append(f'<path d="M{left} {y(0.0)}h{plot_w}" stroke="#bbb"/>')
        if marks is not None:
            out.append(f'<path d="M{left} {y(marks)}h{plot_w}" stroke="{COLOURS["mask"]}" stroke-dasharray="5 4"/>')
            out.append(_text(left + plot_w - 4, y(marks) - 3, f"threshold {marks:g} mm", anchor="end",
                             colour=COLOURS["mask"], css="num", size=10))
        for k, (name, vs) in enumerate(series.items()):
            points = " ".join(f"{x(i)},{y(v)}" for i, v in enumerate(vs) if v is not None)
            out.append(f'<polyline points="{points}" fill="none" stroke="{colours[k % len(colours)]}" '
                       'stroke-width="1.5"/>')
            if len(series) > 1:                             # legend above the panel, right: a line and the name
                lx = left + plot_w - 70 * (len(series) - k)
                out.append(f'<path d="M{lx} {y0 - 9}h14" stroke="{colours[k % len(colours)]}" stroke-width="2"/>')
                out.append(_text(lx + 18, y0 - 5, name, colour=colours[k % len(colours)], css="num", size=11))
        if marks is not None:
            for i, v in enumerate(next(iter(series.values()))):
                if v is not None and v > marks:
                    out.append(f'<circle cx="{x(i)}" cy="{y(v)}" r="3" fill="{COLOURS["mask"]}"/>')
        return out

    body = [f'<rect width="{width}" height="{height}" fill="#f6f7f9"/>',
            *panel(top, {"framewise displacement": fd_mm}, "framewise displacement (mm)", 0.0, None, threshold_mm),
            *panel(top + panel_h + between, {f"along {a}": v for a, v in translations_mm.items()},
                   "mean in-plane translation over the slices (mm), along the voxel axes", None, None, None)]
    axis_y = top + 2 * panel_h + between
    step = max(1, math.ceil(n / 10))
    for i in range(0, len(volumes), step):
        body.append(_text(x(i), axis_y + 14, str(volumes[i]), anchor="middle", colour="#444", css="num", size=10))
    body.append(_text(left + plot_w / 2, height - 2, "volume", anchor="middle", colour="#222", css="num", size=11))
    return _svg(width, height, "Motion per volume: framewise displacement and mean in-plane translation", body,
                style=f"text{{font-family:{FONT}}}")


def run_figures(image: np.ndarray, mask: np.ndarray, affine: np.ndarray, zooms_mm: tuple[float, float, float],
                rows: list[dict[str, Any]], flags: list[dict[str, Any]] | None = None, *,
                reference: np.ndarray | None = None, labels: tuple[np.ndarray, int] | None = None,
                components: list[dict[str, Any]] | None = None) -> dict[str, str]:
    """The three SVG figures of one run: ``{'mosaic', 'sagittal', 'area'}`` → SVG text.

    Parameters
    ----------
    image, mask : (X, Y, Z) ndarray
        The segmented volume and its mask, on-disk voxel order.
    affine : (4, 4) ndarray
        Voxel → scanner RAS+ mm.
    zooms_mm : (3,) tuple of float
        Voxel size along X, Y, Z.
    rows : list of dict
        :func:`episeg_bids.metrics.per_slice` of the mask.
    flags : list of dict, optional
        The run's flags; the slices they name are marked.
    reference : (X, Y, Z) ndarray, optional
        A manual mask on the same grid: drawn with ours, its per-slice Dice under each tile.
    labels, components : optional
        :func:`~episeg_bids.metrics.label_components` and
        :func:`~episeg_bids.metrics.describe_components` of the mask, when the caller has them.
    """
    if labels is None:
        labels = label_components(mask)
    if components is None:
        components = describe_components(mask, affine, zooms_mm, labels=labels)
    volume = to_display(image, mask, affine, zooms_mm, labels=labels[0], reference=reference)
    slice_dice = None
    if reference is not None:
        slice_dice = {row["slice"]: row for row in per_slice_dice(mask, reference, slice_axis(affine))}
    sagittal, layout = sagittal_svg(volume, flags)
    return {"mosaic": mosaic_svg(volume, rows, flags, components=components, slice_dice=slice_dice),
            "sagittal": sagittal, "area": area_svg(rows, volume.slices, layout)}
