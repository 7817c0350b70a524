"""Read an EPI image and make the one 3D volume that is segmented.

A 4D run ``(X, Y, Z, T)`` becomes its float32 temporal mean; a 3D mean EPI ``(X, Y, Z)`` (e.g.
ds005143's ``rec-MoCoMean_bold``) is used as is. Arrays are in on-disk voxel order (NIfTI's
Fortran order: X varies fastest); the affine maps voxel indices to scanner RAS+ millimetres.

Two rules shape this module:

1. **Geometry is checked from the header before any data is read** (:func:`check_geometry`):
   size, voxel size, field of view, affine. The orientation and the spacing are those
   Spinal Cord Toolbox would use (``spinalcordtoolbox/image.py``, see :func:`check_geometry`),
   so masks equal ``sct_deepseg sc_epi``'s; what disagrees in the header becomes a note and a
   ``geometry`` quality flag.
2. **The data stream is read once, sequentially** (:func:`mean_volume`, :func:`read_volume`).
   Slicing nibabel's ``dataobj`` of a ``.nii.gz`` decompresses from the start of the stream for
   every slice; here the raw bytes are read a block at a time into one reused buffer, in the
   on-disk dtype and byte order, and scaled with the header's ``scl_slope``/``scl_inter`` exactly
   as nibabel scales them (no scaling when the slope is 0 or not finite).
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener
from nibabel.spatialimages import HeaderDataError

from .errors import InputImageError

log = logging.getLogger(__name__)

#: Raw (on-disk) bytes read at a time; whole volumes of a run, at least one.
BLOCK_BYTES = 8 * 2**20
#: Default limit on what reading an image may need: its uncompressed data, or the arrays made
#: from it when larger (``--max-image-gb`` raises it). 8 GiB is 20 times a long 128×128×24×1000
#: int16 run and stops headers claiming absurd sizes (or gzip bombs) before any allocation.
MAX_IMAGE_BYTES = 8 * 2**30
#: Plausible voxel size along each axis, in mm. Spinal-cord EPI has 0.5–4 mm in plane and
#: 3–17 mm slices (the real data in tests/data); a mistaken unit or a typed-in size falls outside.
VOXEL_MM_RANGE = (0.1, 25.0)
#: Largest field of view along any voxel axis, in mm (shape × voxel size): larger than any body
#: EPI; nnUNet's resampling of a larger one takes minutes and gigabytes.
MAX_FOV_MM = 500.0
#: Plausible repetition time of an fMRI run, in s. Outside it the header's TR is flagged, not used.
TR_RANGE_S = (0.05, 30.0)
#: Two affines (or voxel sizes) agree when no entry differs by more than this, in mm; SCT's own
#: qform/sform check (``check_affines_match``) uses the same tolerance.
AFFINE_ATOL_MM = 1e-3
#: SCT's ``Image`` relaxes nibabel's quaternion threshold to this before reading the qform.
SCT_QUATERNION_THRESHOLD = -1e-6
#: Text of the quality flags this module raises (for the QC legend).
FLAG_LEGEND = {
    "geometry": "The header's voxel sizes, sform, qform or units disagree or are unusual: check which "
                "spacing and orientation were used (see the message).",
    "timing": "The header's repetition time is implausible (e.g. milliseconds stored as seconds); it was "
              "not used.",
}

_SPACE_UNITS_MM = {0: ("unknown", 1.0), 1: ("meter", 1000.0), 2: ("mm", 1.0), 3: ("micron", 1e-3)}
_TIME_UNITS_S = {0: ("unknown", 1.0), 8: ("sec", 1.0), 16: ("msec", 1e-3), 24: ("usec", 1e-6)}
_COMPRESSED = (".gz", ".bz2", ".zst")
#: Errors that mean the file's bytes are damaged; anything else is ours and propagates as itself.
_DATA_ERRORS = (OSError, EOFError, zlib.error)


@dataclass
class EpiVolume:
    """The 3D volume to segment and what was done to get it.

    Attributes
    ----------
    data : (X, Y, Z) float32 ndarray
        On-disk voxel order, writable; non-finite input values excluded (see ``nonfinite``).
    affine : (4, 4) ndarray
        Voxel → scanner RAS+ mm: the header's best affine as SCT reads it (sform, else qform,
        else pixdim), converted to mm when the header's unit is m or µm.
    zooms_mm : (3,) tuple of float
        Voxel size along X, Y, Z in mm: exactly the spacing given to the network (reversed
        after reorientation) and recorded in sidecars; see :func:`check_geometry`.
    n_volumes : int
        Volumes averaged (1 for a 3D input).
    nonfinite : int
        NaN/Inf samples found in the input (all volumes), excluded from the mean (set to 0 in a
        3D input).
    is_mean_of_run : bool
        True when ``data`` is the temporal mean of a 4D run computed here.
    repetition_time_s : float or None
        TR from the header (pixdim[4] and its unit), None when absent or implausible.
    notes : list of str
        What a reader of the outputs should know (oblique affine, one-volume run, ...).
    flags : list of dict
        Quality flags ``{'code': 'geometry' | 'timing', 'message': str, 'slices': []}``.
    header : Nifti1Header or None
        Copy of the input's own header as nibabel loads it (which replaces a 0 voxel size by 1),
        so outputs can carry its geometry (pixdim, sform/qform and their codes, units).
    volumes : (X, Y, Z, T) float32 ndarray or None
        The whole run, scaled, non-finite samples set to 0 (``keep_volumes=True``, 4D only).
    finite : (X, Y, Z, T) bool ndarray or None
        False where a sample of ``volumes`` was NaN/Inf; None when all were finite.
    """

    data: np.ndarray
    affine: np.ndarray
    zooms_mm: tuple[float, float, float]
    n_volumes: int
    nonfinite: int
    is_mean_of_run: bool
    repetition_time_s: float | None = None
    notes: list[str] = field(default_factory=list)
    flags: list[dict] = field(default_factory=list)
    header: nib.Nifti1Header | None = None
    volumes: np.ndarray | None = None
    finite: np.ndarray | None = None


@dataclass
class Geometry:
    """The voxel grid an image is segmented on, from its header alone.

    Attributes
    ----------
    affine : (4, 4) ndarray
        Voxel → scanner RAS+ mm (see :attr:`EpiVolume.affine`).
    zooms_mm : (3,) tuple of float
        Spacing along X, Y, Z in mm given to the network.
    notes, flags : list
        As in :class:`EpiVolume`.
    """

    affine: np.ndarray
    zooms_mm: tuple[float, float, float]
    notes: list[str] = field(default_factory=list)
    flags: list[dict] = field(default_factory=list)


def load_image(path: Path) -> nib.Nifti1Image:
    """Open a NIfTI image (header only, data stays on disk).

    Raises
    ------
    InputImageError
        If the file cannot be opened, or is not NIfTI-1/2.
    """
    try:
        img = nib.load(path)
    except (ImageFileError, HeaderDataError, ValueError, OSError, EOFError, zlib.error) as err:
        raise InputImageError(f"{path.name} cannot be read as NIfTI ({err}); check or re-export the file") from err
    if not isinstance(img, nib.Nifti1Pair):  # Nifti1Image and Nifti2Image derive from it
        raise InputImageError(f"{path.name} is a {type(img).__name__}, not NIfTI; convert it to .nii.gz")
    return img


def image_kind(path: Path, shape: tuple[int, ...]) -> str:
    """``'run'`` for a 4D image with several volumes, ``'mean'`` for a 3D image.

    A 4D image of a single volume, or with trailing singleton axes, counts as 3D.

    Raises
    ------
    InputImageError
        For 2D images and images with more than 4 non-singleton dimensions.

    Examples
    --------
    >>> image_kind(Path('a_bold.nii.gz'), (64, 64, 20, 1))
    'mean'
    """
    dims = tuple(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims = dims[:-1]
    if len(dims) == 4:
        return "run"
    if len(dims) == 3:
        return "mean"
    raise InputImageError(
        f"{path.name} is {len(dims)}D {tuple(shape)}; expected a 3D mean EPI or a 4D run "
        "(exclude it with --bids-filter-file)"
    )


# --- geometry, from the header only ------------------------------------------------------------

def check_geometry(path: Path, img: nib.Nifti1Image, *, max_bytes: int = MAX_IMAGE_BYTES,
                   keep_volumes: bool = False) -> Geometry:
    """Check the header's grid and return the affine and spacing to segment with; reads no data.

    Rules (SCT 7.x, ``spinalcordtoolbox/image.py``): ``Image.__init__`` sets the qform's
    quaternion threshold to -1e-6 and takes ``hdr.get_best_affine()`` (sform when sform_code ≠ 0,
    else qform when qform_code ≠ 0, else pixdim); ``get_orientation`` takes the axis codes of that
    affine. ``sct_deepseg`` (``deepseg/inference.py``, ``segment_nnunet``) reorients to RAS+
    ("LPI") with ``change_orientation``, which rewrites pixdim from that affine's column norms
    (nibabel's ``set_qform``), then passes ``dim[6:3:-1]`` (pixdim as float32, rounded by
    ``get_dimension``) as the spacing. So the spacing is the affine's column norms, except for an
    image already in RAS+, which is not reoriented: there pixdim itself is used. Same here, with
    two exceptions: a pixdim of 0 or NaN on a RAS+ image (SCT would segment at nibabel's
    replacement, 1 mm, or fail) gives way to the affine's column norms; and a header in metres
    or micrometres (xyzt_units, which SCT ignores) is converted to mm. A qform-only header with
    a zero pixdim is refused (its qform is singular; nibabel's load silently makes it 1 mm).

    Parameters
    ----------
    path : Path
        The image file (its name is used in messages).
    img : Nifti1Image
        The image as :func:`load_image` opened it (header only; its data is not touched).
    max_bytes : int, keyword-only
        Limit on the uncompressed data, and on the arrays built while reading it.
    keep_volumes : bool, keyword-only
        The whole run will also be kept as float32 (counts in the limit).

    Returns
    -------
    Geometry

    Raises
    ------
    InputImageError
        Empty or oversized image, non-finite or singular affine, voxel size or field of view
        outside :data:`VOXEL_MM_RANGE` / :data:`MAX_FOV_MM`.
    """
    name = path.name
    header = _header_as_stored(img)
    shape = tuple(int(n) for n in header.get_data_shape())
    _check_size(name, shape, header.get_data_dtype(), max_bytes=max_bytes, keep_volumes=keep_volumes)
    notes: list[str] = []
    flags: list[dict] = []
    scale = _space_unit_mm(header, notes, flags)
    file_affine, source = _sct_affine(name, header)
    affine = file_affine.copy()
    affine[:3] *= scale
    _check_affine(name, affine, source)
    zooms = _network_spacing(header, file_affine, scale, source, notes, flags)
    _check_plausible(name, zooms, shape[:3], source)
    if source == "pixdim":
        _flag(notes, flags, "geometry", "sform and qform codes are both 0: the orientation is unknown; the image is "
                                        f"taken as {''.join(nib.aff2axcodes(affine))} from pixdim, as nibabel and SCT "
                                        "do; check left-right and anterior-posterior in the QC report")
    if source == "sform" and int(header["qform_code"]) != 0:
        _compare_qform(header, affine, scale, notes, flags)
    _note_obliquity(affine, notes)
    return Geometry(affine, zooms, notes, flags)


def _header_as_stored(img: nib.Nifti1Image) -> nib.Nifti1Header:
    """A copy of ``img.header`` with the zero voxel sizes nibabel's load replaced by 1 put back."""
    header = img.header.copy()
    filename = img.file_map.get("header", img.file_map["image"]).filename  # one file for .nii
    if filename is None:
        return header
    with ImageOpener(filename, "rb") as stream:
        stored = type(header).from_fileobj(stream, check=False)
    zeros = np.asarray(stored["pixdim"][1:4]) == 0
    if zeros.any():
        pixdim = header["pixdim"]
        pixdim[1:4] = np.where(zeros, 0.0, pixdim[1:4])
        header["pixdim"] = pixdim
    return header


def _flag(notes: list[str], flags: list[dict], code: str, message: str) -> None:
    notes.append(message)
    flags.append({"code": code, "message": message, "slices": []})


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def _check_size(name: str, shape: tuple[int, ...], dtype: np.dtype, *, max_bytes: int,
                keep_volumes: bool) -> None:
    if dtype.kind not in "iuf":
        raise InputImageError(f"{name}: the image's datatype is {dtype}; expected real-valued intensities (integer "
                              "or float), export the magnitude image")
    if any(n < 1 for n in shape):
        raise InputImageError(f"{name}: the header's image shape {shape} has an empty or negative dimension; "
                              "expected sizes >= 1, re-export the image")
    n_samples = math.prod(shape)
    n_voxels = math.prod(shape[:3])
    working = n_voxels * 16 if len(shape) > 3 else n_voxels * 4   # float64 sum, counts, float32 mean
    if keep_volumes:
        working += n_samples * 5                                   # float32 run + finite mask
    need = max(n_samples * dtype.itemsize, working)
    if need > max_bytes:
        raise InputImageError(
            f"{name}: the header claims a {shape} {dtype.name} image, {need / 2**30:.2f} GB to read, above the "
            f"limit of {max_bytes / 2**30:.2f} GB; check the header (dim, datatype), or raise the limit with "
            "--max-image-gb if the image is genuine")


def _space_unit_mm(header: nib.Nifti1Header, notes: list[str], flags: list[dict]) -> float:
    code = int(header["xyzt_units"]) & 0x07
    unit, scale = _SPACE_UNITS_MM.get(code, ("invalid", 1.0))
    if unit in ("unknown", "invalid"):
        notes.append(f"spatial unit {unit} in the header (xyzt_units code {code}): millimetres assumed, as SCT "
                     "and nibabel do")
    elif unit != "mm":
        _flag(notes, flags, "geometry", f"spatial unit '{unit}' in the header: sizes converted to mm (x{scale:g}); "
                                        "SCT ignores the unit and would segment at the wrong scale")
    return scale


def _sct_affine(name: str, header: nib.Nifti1Header) -> tuple[np.ndarray, str]:
    """The best affine as SCT's ``Image`` reads it (file units), and its source."""
    relaxed = header.copy()
    relaxed.quaternion_threshold = SCT_QUATERNION_THRESHOLD
    source = ("sform" if int(header["sform_code"]) != 0 else
              "qform" if int(header["qform_code"]) != 0 else "pixdim")
    try:
        return np.asarray(relaxed.get_best_affine(), dtype=np.float64), source
    except (HeaderDataError, ValueError) as err:
        raise InputImageError(f"{name}: the {source} cannot be read ({err}); fix the header's {source} "
                              "or re-export the image") from err


def _check_affine(name: str, affine: np.ndarray, source: str) -> None:
    fix = ("fix the header (e.g. fslorient -copyqform2sform, or sct_image -set-sform-to-qform, when the qform "
           "is right) or re-export the image")
    matrix = affine[:3, :3]
    if not np.all(np.isfinite(affine)):
        raise InputImageError(f"{name}: the {source} has non-finite values {affine[:3].tolist()}; expected a "
                              f"finite voxel-to-world matrix; {fix}")
    norms = np.sqrt((matrix**2).sum(axis=0))
    det = abs(float(np.linalg.det(matrix / np.where(norms > 0, norms, 1.0)))) if np.all(norms > 0) else 0.0
    if det < 0.1:  # zero column, or voxel axes within ~6 degrees of each other: no acquisition grid
        raise InputImageError(f"{name}: the {source} is singular (voxel axes {_fmt(norms)} mm long, normalised "
                              f"determinant {det:.2g}); expected an invertible voxel-to-world matrix; {fix}")


def _as_sct_reads(value: float) -> float:
    """A float32 header value as SCT's ``get_dimension`` reads it: rounded to its float32 precision."""
    stored = np.float32(value)
    exponent = int(np.floor(np.log10(np.abs(np.spacing(stored)))))
    return round(float(stored), -exponent - 1)


def _network_spacing(header: nib.Nifti1Header, file_affine: np.ndarray, scale: float, source: str,
                     notes: list[str], flags: list[dict]) -> tuple[float, float, float]:
    """Spacing along X, Y, Z in mm that SCT would give the network (see :func:`check_geometry`)."""
    pixdim = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    norms = np.sqrt((file_affine[:3, :3] ** 2).sum(axis=0))
    pixdim_ok = bool(np.all(np.isfinite(pixdim) & (pixdim > 0)))
    is_ras = nib.aff2axcodes(file_affine) == ("R", "A", "S")
    used = pixdim if (is_ras and pixdim_ok) else norms
    zooms = tuple(_as_sct_reads(z) * scale for z in used)
    agree = pixdim_ok and np.allclose(pixdim * scale, norms * scale, rtol=0, atol=AFFINE_ATOL_MM)
    if not agree:
        if not pixdim_ok and is_ras:
            why = (f"pixdim is not usable and the {source}'s is used (SCT does not reorient a RAS+ image and "
                   "would read pixdim: 1 mm for a 0, as nibabel loads it, or fail for NaN)")
        elif not pixdim_ok:
            why = f"pixdim is not usable; the {source}'s used, as SCT does"
        elif is_ras:
            why = "pixdim used, as SCT does for an image already in RAS+ (it takes the size from the affine only " \
                  "when it reorients)"
        else:
            why = f"the {source}'s used, as SCT does (its reorientation to RAS+ rewrites pixdim from the {source})"
        _flag(notes, flags, "geometry",
              f"voxel size in pixdim {_fmt(pixdim * scale)} mm differs from the {source}'s {_fmt(norms * scale)} mm; "
              f"{why}: segmented and measured at {_fmt(zooms)} mm")
    return zooms  # type: ignore[return-value]


def _check_plausible(name: str, zooms: tuple[float, ...], shape: tuple[int, ...], source: str) -> None:
    low, high = VOXEL_MM_RANGE
    if not all(low <= z <= high for z in zooms):
        raise InputImageError(
            f"{name}: voxel size {_fmt(zooms)} mm (from the {source}) is outside the plausible EPI range "
            f"{low:g}-{high:g} mm per axis; fix {'pixdim' if source == 'pixdim' else 'pixdim/' + source} or the unit (xyzt_units) in the header")
    fov = [n * z for n, z in zip(shape, zooms)]
    if max(fov) > MAX_FOV_MM:
        raise InputImageError(
            f"{name}: field of view {_fmt(fov)} mm (shape {shape} x voxel size {_fmt(zooms)} mm) exceeds "
            f"{MAX_FOV_MM:g} mm; check the voxel size and unit (xyzt_units) in the header")


def _compare_qform(header: nib.Nifti1Header, affine: np.ndarray, scale: float, notes: list[str],
                   flags: list[dict]) -> None:
    relaxed = header.copy()
    relaxed.quaternion_threshold = SCT_QUATERNION_THRESHOLD
    codes = f"qform code {int(header['qform_code'])}, sform code {int(header['sform_code'])}"
    try:
        qform = np.asarray(relaxed.get_qform(), dtype=np.float64)
    except (HeaderDataError, ValueError) as err:
        _flag(notes, flags, "geometry", f"the qform cannot be read ({err}; {codes}); the sform is used, as SCT does")
        return
    qform[:3] *= scale
    if not np.isfinite(qform).all():
        _flag(notes, flags, "geometry", f"the qform is not finite (NaN voxel size or quaternion; {codes}); the sform "
                                        "is used, as SCT does; tools that prefer the qform cannot place this image")
        return
    gap = float(np.abs(qform - affine).max())
    if not gap <= AFFINE_ATOL_MM:
        axcodes = "".join(code or "?" for code in nib.aff2axcodes(qform))
        _flag(notes, flags, "geometry",
              f"the qform differs from the sform by up to {gap:.3g} mm ({codes}, qform orientation {axcodes}); "
              "the sform is used, as SCT and nibabel do; tools that prefer the qform place this image differently")


def _note_obliquity(affine: np.ndarray, notes: list[str]) -> None:
    axes = np.abs(affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0))
    obliquity_deg = float(np.degrees(np.arccos(np.clip(axes.max(axis=0), -1, 1))).max())
    if obliquity_deg > 1.0:
        notes.append(
            f"oblique affine ({obliquity_deg:.1f} deg from the closest canonical axes): reoriented "
            "by permutation and flips only, as SCT does"
        )


def _repetition_time(header: nib.Nifti1Header, notes: list[str], flags: list[dict]) -> float | None:
    """Repetition time in s from pixdim[4] and its unit (xyzt_units), or None.

    Unit s, ms or µs (unknown: s, noted). A TR outside :data:`TR_RANGE_S` is flagged (``timing``)
    and not used, with a hint when a factor of 1000 would make it plausible (a TR in ms stored
    with unit 'sec' is a classic converter error). 0 or non-finite: no TR, None.
    """
    value = float(header["pixdim"][4])
    code = int(header["xyzt_units"]) & 0x38
    if not math.isfinite(value) or value <= 0:
        return None
    if code not in _TIME_UNITS_S:
        notes.append(f"pixdim[4] = {value:g} has a non-time unit (xyzt_units time code {code}): no TR from the header")
        return None
    unit, scale = _TIME_UNITS_S[code]
    tr = _as_sct_reads(value) * scale  # float32 noise removed: 1.13, not 1.1299999952
    low, high = TR_RANGE_S
    if low <= tr <= high:
        if unit == "unknown":
            notes.append(f"time unit not set in the header: pixdim[4] = {value:g} taken as seconds")
        return tr
    hint = (" (milliseconds stored as seconds?)" if low <= tr / 1000 <= high else
            " (seconds stored as milliseconds?)" if low <= tr * 1000 <= high else "")
    _flag(notes, flags, "timing",
          f"repetition time {value:g} {unit} in the header is outside {low:g}-{high:g} s{hint}; not used (the "
          "sidecar's RepetitionTime is used when present)")
    return None


# --- the data stream, read once ---------------------------------------------------------------

@contextmanager
def _data_errors(name: str) -> Iterator[None]:
    """Report damaged bytes (zlib, EOF, short read, OS read errors) as a damaged file."""
    try:
        yield
    except _DATA_ERRORS as err:
        raise InputImageError(
            f"{name}: the image data cannot be read ({type(err).__name__}: {err}); the file is truncated or "
            "corrupt, re-copy or re-export it") from err


def _raw_chunks(img: nib.Nifti1Image, chunk_items: int) -> Iterator[np.ndarray]:
    """Consecutive pieces of the image's raw samples, in on-disk (Fortran) order and dtype.

    One sequential pass over the (compressed) stream into one reused buffer: each yielded array
    is overwritten by the next. In-memory images yield views of their array instead.
    """
    proxy = img.dataobj
    total = math.prod(img.shape)
    if not nib.is_proxy(proxy):
        flat = np.asarray(proxy).reshape(-1, order="F")
        for start in range(0, total, chunk_items):
            yield flat[start:start + chunk_items]
        return
    filename = os.fspath(proxy.file_like)
    name = os.path.basename(filename)
    dtype = proxy.dtype
    buffer = np.empty(min(chunk_items, total) * dtype.itemsize, np.uint8)
    with _data_errors(name):
        if not filename.endswith(_COMPRESSED):
            needed = proxy.offset + total * dtype.itemsize
            if os.path.getsize(filename) < needed:
                raise EOFError(f"{os.path.getsize(filename)} bytes, the header needs {needed}")
        with ImageOpener(filename, "rb") as stream:
            stream.seek(proxy.offset)
            for start in range(0, total, chunk_items):
                raw = buffer[:min(chunk_items, total - start) * dtype.itemsize]
                _read_exactly(stream, raw)
                yield raw.view(dtype)
            _check_stream_end(stream)


def _check_stream_end(stream) -> None:
    """Read on at the end of the data: a .gz stream then checks its CRC-32 and length."""
    try:
        stream.read(1)
    except gzip.BadGzipFile as err:
        if not str(err).startswith("Not a gzipped file"):  # CRC or length mismatch: damaged data
            raise
        # else bytes after the last gzip member (padding): nibabel reads such files, so do we


def _read_exactly(stream, raw: np.ndarray) -> None:
    filled = 0
    while filled < raw.size:
        got = stream.readinto(raw[filled:])
        if not got:
            raise EOFError(f"expected {raw.size} bytes of image data, got {filled}")
        filled += got


@dataclass
class _Run:
    mean: np.ndarray                 # (N,) float32, N voxels in Fortran order
    nonfinite: int
    volumes: np.ndarray | None       # (T, N) float32
    finite: np.ndarray | None        # (T, N) bool


def _raw_format(img: nib.Nifti1Image) -> tuple[np.dtype, float, float]:
    """On-disk dtype (with byte order) and the scaling nibabel applies (1, 0 when none)."""
    proxy = img.dataobj
    if nib.is_proxy(proxy):
        return proxy.dtype, float(proxy.slope), float(proxy.inter)
    return np.asarray(proxy).dtype, 1.0, 0.0


def _scaled(raw: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """``raw * slope + inter`` in float64 as nibabel's ``apply_read_scaling`` computes it."""
    if (slope, inter) == (1.0, 0.0):
        return raw
    out = raw * np.float64(slope)
    if inter != 0.0:
        out += np.float64(inter)
    return out


def _store_scaled(raw: np.ndarray, slope: float, inter: float, out: np.ndarray) -> None:
    """``out[...] = raw * slope + inter`` (float64, then cast), a piece at a time to bound the temporary."""
    if (slope, inter) == (1.0, 0.0):
        out[...] = raw
        return
    raw, flat = raw.reshape(-1), out.reshape(-1)  # both contiguous: views
    piece = 2**20
    for start in range(0, raw.size, piece):
        flat[start:start + piece] = _scaled(raw[start:start + piece], slope, inter)


def _finite_sums(block: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-voxel float64 sums of a ``(k, N)`` block over its finite samples, and the number of
    NaN/Inf samples per voxel (None when there are none)."""
    sums = block.sum(axis=0, dtype=np.float64)
    if block.dtype.kind != "f":
        return sums, None
    bad = np.flatnonzero(~np.isfinite(sums))  # a float64 sum of float32/64 samples is finite iff they all are
    if not bad.size:
        return sums, None
    columns = block[:, bad]
    good = np.isfinite(columns)
    sums[bad] = np.where(good, columns, 0).sum(axis=0, dtype=np.float64)
    missing = np.zeros(block.shape[1], np.int32)
    missing[bad] = block.shape[0] - good.sum(axis=0, dtype=np.int32)
    return sums, missing


def _store_finite(block: np.ndarray, slope: float, inter: float, out: np.ndarray) -> np.ndarray | None:
    """Store the scaled ``block`` into float32 ``out`` with NaN/Inf set to 0; return the mask of
    finite samples when some were not (else None)."""
    _store_scaled(block, slope, inter, out)
    if block.dtype.kind != "f" and (slope, inter) == (1.0, 0.0):
        return None  # integers stay finite
    good = np.isfinite(out)
    if good.all():
        return None
    out[~good] = 0
    return good


def _accumulate_run(img: nib.Nifti1Image, *, block_bytes: int, keep_volumes: bool) -> _Run:
    """Temporal mean (and optionally the float32 run) of a 4D image in one pass."""
    n_voxels, n_volumes = math.prod(img.shape[:3]), img.shape[3]
    raw_dtype, slope, inter = _raw_format(img)
    step = max(1, min(n_volumes, block_bytes // (n_voxels * raw_dtype.itemsize)))
    total = np.zeros(n_voxels)
    missing = np.zeros(n_voxels, np.int32)
    volumes = np.empty((n_volumes, n_voxels), np.float32) if keep_volumes else None
    finite: np.ndarray | None = None
    start = 0
    for chunk in _raw_chunks(img, step * n_voxels):
        block = chunk.reshape(-1, n_voxels)  # (k, N): k volumes
        stop = start + block.shape[0]
        sums, block_missing = _finite_sums(block)
        total += sums
        if block_missing is not None:
            missing += block_missing
        if volumes is not None:
            good = _store_finite(block, slope, inter, volumes[start:stop])
            if good is not None:
                finite = np.ones(volumes.shape, bool) if finite is None else finite
                finite[start:stop] = good
        start = stop
    counts = n_volumes - missing
    mean = np.divide(total, counts, out=np.zeros(n_voxels), where=counts > 0)
    mean = np.where(counts > 0, _scaled(mean, slope, inter), 0.0)
    return _Run(mean.astype(np.float32), int(missing.sum(dtype=np.int64)), volumes, finite)


def mean_volume(img: nib.Nifti1Image, *, block_bytes: int = BLOCK_BYTES) -> tuple[np.ndarray, int]:
    """Temporal mean of a 4D run, as float32, skipping NaN/Inf samples, in one pass over the file.

    Blocks of whole volumes (at most ``block_bytes`` of raw data, at least one volume) are read
    sequentially into one buffer and summed in float64, so the result equals
    ``img.get_fdata().mean(axis=3)`` (NaN-aware) to float32 rounding.

    Parameters
    ----------
    img : Nifti1Image
        ``(X, Y, Z, T)`` run; trailing singleton axes are ignored.
    block_bytes : int, keyword-only
        Raw bytes read at a time.

    Returns
    -------
    mean : (X, Y, Z) float32 ndarray
        On-disk voxel order; mean over the finite samples of each voxel, 0 where a voxel has none.
    nonfinite : int
        Number of NaN/Inf samples excluded.

    Raises
    ------
    InputImageError
        If the data is truncated or corrupt (other errors propagate as themselves).
    """
    run = _accumulate_run(img, block_bytes=block_bytes, keep_volumes=False)
    return run.mean.reshape(img.shape[:3], order="F"), run.nonfinite


def _read_3d(img: nib.Nifti1Image, *, block_bytes: int) -> tuple[np.ndarray, int]:
    """(X, Y, Z) float32 data of a 3D image (scaled, NaN/Inf set to 0) and the NaN/Inf count."""
    raw_dtype, slope, inter = _raw_format(img)
    flat = np.empty(math.prod(img.shape), np.float32)
    nonfinite = 0
    start = 0
    for chunk in _raw_chunks(img, max(1, block_bytes // raw_dtype.itemsize)):
        good = _store_finite(chunk, slope, inter, flat[start:start + chunk.size])
        nonfinite += 0 if good is None else int(good.size - np.count_nonzero(good))
        start += chunk.size
    return flat.reshape(img.shape[:3], order="F"), nonfinite


def read_volume(path: Path, *, max_bytes: int = MAX_IMAGE_BYTES, keep_volumes: bool = False,
                block_bytes: int = BLOCK_BYTES) -> EpiVolume:
    """The volume to segment from ``path``: the temporal mean of a 4D run, or the 3D image.

    The header is checked first (:func:`check_geometry`); then the data is read in one
    sequential pass.

    Parameters
    ----------
    path : Path
        A NIfTI file, ``(X, Y, Z)`` or ``(X, Y, Z, T)`` (trailing singleton axes allowed).
    max_bytes : int, keyword-only
        Refuse images whose uncompressed data (or the arrays made from it) exceed this.
    keep_volumes : bool, keyword-only
        For a 4D run, also return the whole run as ``volumes`` (float32) and ``finite``, read in
        the same pass (for motion correction).
    block_bytes : int, keyword-only
        Raw bytes read at a time (see :func:`mean_volume`).

    Returns
    -------
    EpiVolume

    Raises
    ------
    InputImageError
        Unreadable, 2D or 5D image; implausible geometry (see :func:`check_geometry`); truncated
        or corrupt data.
    """
    img = load_image(path)
    kind = image_kind(path, img.shape)
    geometry = check_geometry(path, img, max_bytes=max_bytes, keep_volumes=keep_volumes and kind == "run")
    notes, flags = geometry.notes, geometry.flags
    volumes = finite = None
    tr = None
    if kind == "run":
        tr = _repetition_time(img.header, notes, flags)
        run = _accumulate_run(img, block_bytes=block_bytes, keep_volumes=keep_volumes)
        data, nonfinite, n_volumes = run.mean.reshape(img.shape[:3], order="F"), run.nonfinite, img.shape[3]
        if run.volumes is not None:
            volumes = run.volumes.T.reshape((*img.shape[:3], n_volumes), order="F")
            finite = None if run.finite is None else run.finite.T.reshape(volumes.shape, order="F")
        if n_volumes < 5:
            notes.append(f"only {n_volumes} volumes averaged: the mean is noisy")
    else:
        data, nonfinite = _read_3d(img, block_bytes=block_bytes)
        n_volumes = 1
    if nonfinite and nonfinite >= data.size * n_volumes:
        raise InputImageError(f"{path.name} holds no finite value (every sample is NaN or Inf); check how it was "
                              "made, or exclude it with --bids-filter-file")
    if nonfinite:
        notes.append(f"{nonfinite} NaN/Inf values excluded from the input (set to 0 in a 3D input)")
    return EpiVolume(
        data=data,
        affine=geometry.affine,
        zooms_mm=geometry.zooms_mm,
        n_volumes=n_volumes,
        nonfinite=nonfinite,
        is_mean_of_run=kind == "run",
        repetition_time_s=tr,
        notes=notes,
        flags=flags,
        header=img.header.copy(),
        volumes=volumes,
        finite=finite,
    )
