"""A corpus of odd and broken inputs, each placed among good runs (see docs/robustness.md).

Every case writes one input into a BIDS dataset, under its own participant ``sub-<id>``, built
from the real images in tests/data (the real 4D run ``SCT_RUN`` and the real 3D mean
``LEIPZIG``) or, for what no scanner writes, from bytes. ``outcome`` is what the participant
level must do with it: ``failed`` (an error line naming the file and the fix, a crash file, no
output, the other inputs unaffected) or ``done`` (segmented, with ``expect`` in the sidecar's
notes or flags when it is legal but odd). ``expect`` is a regular expression.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from conftest import LEIPZIG, SCT_RUN

N_VOLUMES = 8   # volumes kept from the real 4D run: enough for a mean, fast to segment


@dataclass(frozen=True)
class Case:
    id: str                                  # also the participant label: letters and digits only
    what: str
    outcome: str                             # 'failed' or 'done'
    expect: str                              # regex: in the error line, or in the mask sidecar's notes/flags
    build: Callable[[Path, str], Path]       # (func folder, file stem 'sub-<id>_task-rest') -> input path


def real_run() -> nib.Nifti1Image:
    """The real 4D run, first volumes only, int16, 0.96 × 0.96 × 16.8 mm, TR 1.13 s."""
    img = nib.load(SCT_RUN)
    data = np.asanyarray(img.dataobj)[..., :N_VOLUMES]
    out = nib.Nifti1Image(data, img.affine, img.header)
    out.set_data_dtype(np.int16)
    return out


def _save(img: nib.Nifti1Image, folder: Path, stem: str, ext: str = ".nii.gz") -> Path:
    path = folder / f"{stem}_bold{ext}"
    nib.save(img, path)
    return path


def _run_like(data: np.ndarray, **header) -> nib.Nifti1Image:
    base = real_run()
    img = nib.Nifti1Image(data, base.affine, base.header)
    img.set_data_dtype(data.dtype)
    for key, value in header.items():
        img.header[key] = value
    return img


def _bytes(content: bytes, ext: str = ".nii.gz") -> Callable[[Path, str], Path]:
    def build(folder: Path, stem: str) -> Path:
        path = folder / f"{stem}_bold{ext}"
        path.write_bytes(content)
        return path
    return build


def _header_with(**fields) -> Callable[[Path, str], Path]:
    """The real run with raw header fields changed (after nibabel has set the rest)."""
    def build(folder: Path, stem: str) -> Path:
        img = real_run()
        header = img.header
        for key, value in fields.items():
            if key == "zooms":
                header["pixdim"][1:1 + len(value)] = value
            elif key == "units":
                header.set_xyzt_units(*value)
            else:
                header[key] = value
        path = folder / f"{stem}_bold.nii.gz"
        # write the header exactly as given (nib.save would re-derive fields from the affine)
        raw = np.asanyarray(img.dataobj).astype("<i2")
        header.set_data_dtype("<i2")
        with gzip.open(path, "wb") as f:
            f.write(header.binaryblock + b"\0" * (int(header["vox_offset"]) - header.sizeof_hdr))
            f.write(raw.tobytes(order="F"))
        return path
    return build


def _affine_case(affine: np.ndarray, *, qform: np.ndarray | None = None):
    """The real run with this sform (and another qform, if given), both code 1."""
    def build(folder: Path, stem: str) -> Path:
        base = real_run()
        img = nib.Nifti1Image(np.asanyarray(base.dataobj), affine, base.header)
        img.set_sform(affine, code=1)
        img.set_qform(affine if qform is None else qform, code=1)
        return _save(img, folder, stem)
    return build


def _rotation(deg: float) -> np.ndarray:
    base = real_run().affine.copy()
    a = np.radians(deg)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    base[:3, :3] = rot @ base[:3, :3]
    return base


def _name(name_for: Callable[[str], str], source: Path = SCT_RUN) -> Callable[[Path, str], Path]:
    def build(folder: Path, stem: str) -> Path:
        path = folder / name_for(stem)
        nib.save(real_run(), path) if source == SCT_RUN else path.write_bytes(source.read_bytes())
        return path
    return build


def _with_sidecar(text: str) -> Callable[[Path, str], Path]:
    def build(folder: Path, stem: str) -> Path:
        (folder / f"{stem}_bold.json").write_text(text)
        return _save(real_run(), folder, stem)
    return build


def _data(transform: Callable[[np.ndarray], np.ndarray], ext: str = ".nii.gz", **header):
    def build(folder: Path, stem: str) -> Path:
        data = transform(np.asanyarray(real_run().dataobj).astype(np.float32))
        return _save(_run_like(data, **header), folder, stem, ext)
    return build


def _with_nans(fraction_volumes: int) -> Callable[[np.ndarray], np.ndarray]:
    def transform(data: np.ndarray) -> np.ndarray:
        data = data.copy()
        data[::7, ::5, :, :fraction_volumes] = np.nan
        data[0, 0, 0, -1] = np.inf
        return data
    return transform


def _leipzig(transform: Callable[[nib.Nifti1Image], nib.Nifti1Image]) -> Callable[[Path, str], Path]:
    def build(folder: Path, stem: str) -> Path:
        return _save(transform(nib.load(LEIPZIG)), folder, stem)
    return build


def _nifti2(folder: Path, stem: str) -> Path:
    img = real_run()
    return _save(nib.Nifti2Image(np.asanyarray(img.dataobj), img.affine, nib.Nifti2Header.from_header(img.header)),
                 folder, stem)


def _big_endian(folder: Path, stem: str) -> Path:
    img = real_run()
    header = img.header.as_byteswapped(">")
    return _save(nib.Nifti1Image(np.asanyarray(img.dataobj).astype(">i2"), img.affine, header), folder, stem)


def _broken_link(folder: Path, stem: str) -> Path:
    path = folder / f"{stem}_bold.nii.gz"
    os.symlink("../../.git/annex/objects/XX/YY/MD5E-s123--abc.nii.gz/MD5E-s123--abc.nii.gz", path)
    return path


def _declared_huge(folder: Path, stem: str) -> Path:
    """A 348-byte header that claims 30000^3 int16 voxels (54 TB), and almost no data."""
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.int16)
    header.set_zooms((1.0, 1.0, 1.0))
    path = folder / f"{stem}_bold.nii.gz"
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4 + b"\0" * 1024)
    return path


def _gzip_bomb(folder: Path, stem: str) -> Path:
    """About 0.5 MB of gzip that expands to 2 GB of zeros behind a consistent header."""
    shape = (1024, 1024, 64, 16)                   # 2 GiB of int16
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_zooms((1.0, 1.0, 1.0, 1.0))
    path = folder / f"{stem}_bold.nii.gz"
    zeros = b"\0" * (64 * 2**20)
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(header.binaryblock + b"\0" * 4)
        for _ in range(32):
            f.write(zeros)
    return path


def _header_only(folder: Path, stem: str) -> Path:
    img = real_run()
    path = folder / f"{stem}_bold.nii.gz"
    with gzip.open(path, "wb") as f:
        f.write(img.header.binaryblock + b"\0" * 4)
    return path


def _uncompressed_as_gz(folder: Path, stem: str) -> Path:
    tmp = folder / f"{stem}.tmp.nii"
    nib.save(real_run(), tmp)
    path = folder / f"{stem}_bold.nii.gz"
    tmp.rename(path)
    return path


def _truncated(ext: str) -> Callable[[Path, str], Path]:
    def build(folder: Path, stem: str) -> Path:
        path = _save(real_run(), folder, stem, ext)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path
    return build


def _dims(dims: list[int]) -> Callable[[Path, str], Path]:
    def build(folder: Path, stem: str) -> Path:
        data = np.zeros([d for d in dims if d > 0], np.int16)
        return _save(nib.Nifti1Image(data, real_run().affine), folder, stem)
    return build


def _vox_offset_past_end(folder: Path, stem: str) -> Path:
    """The data follows the header, but vox_offset says it starts 10 MB later."""
    img = real_run()
    header = img.header
    header["vox_offset"] = 10_000_000
    path = folder / f"{stem}_bold.nii.gz"
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4)
        f.write(np.asanyarray(img.dataobj).astype("<i2").tobytes(order="F"))
    return path


CASES: tuple[Case, ...] = (
    # --- unreadable files --------------------------------------------------------------------
    Case("truncgz", "gzipped 4D run cut in the middle (interrupted copy)", "failed", r"truncated|corrupt",
         _truncated(".nii.gz")),
    Case("truncnii", "uncompressed .nii cut in the middle", "failed", r"truncated|corrupt", _truncated(".nii")),
    Case("empty", "empty file (0 bytes)", "failed", r"cannot be read|empty", _bytes(b"")),
    Case("garbage", "random bytes named .nii.gz", "failed", r"cannot be read|corrupt|not gzip",
         _bytes(np.random.default_rng(3).bytes(5000))),
    Case("notgzip", "uncompressed NIfTI named .nii.gz", "failed", r"gzip|cannot be read", _uncompressed_as_gz),
    Case("headeronly", "a valid header and no voxel data", "failed", r"truncated|corrupt", _header_only),
    Case("voxoffset", "vox_offset pointing past the end of the data", "failed", r"truncated|corrupt|vox_offset",
         _vox_offset_past_end),
    Case("brokenlink", "broken symbolic link (DataLad/git-annex content not retrieved)", "failed",
         r"symbolic link|does not exist|datalad get", _broken_link),
    # --- shapes and types ----------------------------------------------------------------------
    Case("twod", "2D image", "failed", r"is 2D", _dims([64, 64])),
    Case("fived", "5D image (two 4D series)", "failed", r"5D", _dims([8, 8, 4, 3, 2])),
    Case("onevolume", "4D run of one volume", "done", "", _data(lambda d: d[..., :1])),
    Case("twovolumes", "4D run of two volumes", "done", r"only 2 volumes", _data(lambda d: d[..., :2])),
    Case("complex", "complex64 voxels", "failed", r"complex", _data(lambda d: d.astype(np.complex64))),
    Case("rgb", "RGB24 voxels", "failed", r"RGB|rgb|dtype|data type",
         lambda folder, stem: _save(nib.Nifti1Image(np.zeros((8, 8, 4), [("R", "u1"), ("G", "u1"), ("B", "u1")]),
                                                    real_run().affine), folder, stem)),
    Case("int64", "int64 voxels", "done", "", _data(lambda d: d.astype(np.int64))),
    Case("uint8", "uint8 voxels (rescaled run)", "done", "",
         _data(lambda d: np.clip(d / d.max() * 255, 0, 255).astype(np.uint8))),
    Case("float64", "float64 voxels", "done", "", _data(lambda d: d.astype(np.float64))),
    Case("bigendian", "big-endian int16", "done", "", _big_endian),
    Case("nifti2", "NIfTI-2 file", "done", "", _nifti2),
    Case("uncompressed", "uncompressed .nii run", "done", "", _data(lambda d: d.astype(np.int16), ext=".nii")),
    Case("trailing5d", "4D run stored with a trailing singleton 5th axis", "done", "",
         _data(lambda d: d[..., None].astype(np.int16))),
    Case("float32big", "float32 4D run larger than one read block (written by motion correction)", "done", "",
         _data(lambda d: np.repeat(d, 40, axis=3)[..., :300].astype(np.float32))),
    # --- values ----------------------------------------------------------------------------------
    Case("nanvoxels", "float32 run with NaN and Inf samples", "done", r"NaN", _data(_with_nans(3))),
    Case("allnan", "float32 run that is NaN everywhere", "failed", r"no finite|NaN", _data(lambda d: d * np.nan)),
    Case("zeros", "all-zero image", "done", r"empty|constant", _data(lambda d: d * 0)),
    Case("brain", "brain BOLD, not spinal cord (nibabel test data)", "done", "",
         lambda folder, stem: _save(nib.load(SCT_RUN.parents[3] / "sub-brain01/func/sub-brain01_task-rest_bold.nii.gz"),
                                    folder, stem)),
    # --- geometry --------------------------------------------------------------------------------
    Case("nanpixdim", "NaN voxel size in pixdim (the sform is valid)", "done", r"pixdim|qform",
         _header_with(zooms=[np.nan, 0.96, 16.8])),
    Case("hugevoxels", "50 mm voxels", "failed", r"voxel size|plausible|field of view", _header_with(zooms=[50, 50, 50],
                                                                                                     sform_code=0, qform_code=0)),
    Case("metrevoxels", "1000 mm voxels (metres written as mm)", "failed", r"voxel size|plausible|field of view",
         _header_with(zooms=[1000, 1000, 1000], sform_code=0, qform_code=0)),
    Case("micron", "voxel sizes in micrometres (xyzt_units = micron)", "done", "",
         _header_with(zooms=[955.8824, 955.8824, 16800.0], units=("micron", "sec"), sform_code=0, qform_code=0)),
    Case("hugeheader", "header claiming 30000^3 voxels", "failed", r"--max-image-gb|too large|GB", _declared_huge),
    Case("gzipbomb", "0.5 MB of gzip expanding to 2 GiB", "failed", r"--max-image-gb|too large|GB", _gzip_bomb),
    Case("zeroaffine", "sform and qform all zeros", "failed", r"affine|singular|sform|qform",
         _header_with(srow_x=[0, 0, 0, 0], srow_y=[0, 0, 0, 0], srow_z=[0, 0, 0, 0], qform_code=0, sform_code=1)),
    Case("singular", "sform of rank 2", "failed", r"affine|singular|sform",
         _header_with(srow_x=[1, 0, 0, 0], srow_y=[1, 0, 0, 0], srow_z=[0, 0, 16.8, 0], qform_code=0, sform_code=1)),
    Case("pixdimzero", "pixdim z = 0 while the sform says 16.8 mm", "done", r"pixdim is not usable",
         _header_with(zooms=[0.9558824, 0.9558824, 0.0])),
    Case("pixdimsform", "pixdim disagrees with the sform (2 mm vs 0.96 mm)", "done", r"pixdim|sform",
         _header_with(zooms=[2.0, 2.0, 16.8])),
    Case("qformsform", "qform and sform disagree (rotated 20 degrees)", "done", r"qform|sform",
         _affine_case(real_run().affine, qform=_rotation(20))),
    Case("oblique", "oblique acquisition (20 degrees)", "done", r"oblique", _affine_case(_rotation(20))),
    Case("noorient", "sform and qform codes 0 (orientation unknown)", "done", r"orientation|code",
         _header_with(sform_code=0, qform_code=0)),
    # --- metadata ---------------------------------------------------------------------------------
    Case("badjson", "sidecar that is not valid JSON", "failed", r"JSON", _with_sidecar('{"RepetitionTime": 1.13,')),
    Case("listjson", "sidecar that is a JSON list", "failed", r"JSON", _with_sidecar("[1.13]")),
    Case("trstring", "RepetitionTime given as a string", "done", r"RepetitionTime", _with_sidecar('{"RepetitionTime": "1.13"}')),
    Case("trmismatch", "sidecar RepetitionTime 2.5 s, header 1.13 s", "done", r"RepetitionTime 2\.5 s",
         _with_sidecar('{"RepetitionTime": 2.5}')),
    Case("trmillis", "TR of 1130 s in the header (milliseconds written as seconds), no sidecar TR", "done",
         r"RepetitionTime|TR", _header_with(zooms=[0.9558824, 0.9558824, 16.8, 1130.0])),
    # --- names ------------------------------------------------------------------------------------
    Case("quote", "file name with a quote", "failed", r"not a BIDS|BIDS name", _name(lambda s: f"{s}_acq-a'b_bold.nii.gz")),
    Case("angle", "file name with '<'", "failed", r"not a BIDS|BIDS name", _name(lambda s: f"{s}_acq-a<b_bold.nii.gz")),
    Case("newline", "file name with a newline", "failed", r"not a BIDS|BIDS name", _name(lambda s: f"{s}_acq-a\nb_bold.nii.gz")),
    Case("dashlabel", "label with a dash (task-rest-eyesopen)", "failed", r"not a BIDS|BIDS name",
         _name(lambda s: s.replace("task-rest", "task-rest-eyesopen") + "_bold.nii.gz")),
    Case("longlabel", "170-character acq label", "done", "", _name(lambda s: f"{s}_acq-{'a' * 170}_bold.nii.gz")),
    Case("toolong", "label so long that the output names exceed 255 bytes", "failed", r"shorten|too long|255",
         _name(lambda s: f"{s}_acq-{'a' * 200}_bold.nii.gz")),
    Case("unicode", "non-ASCII label (acq-é)", "failed", r"not a BIDS|BIDS name", _name(lambda s: f"{s}_acq-\u00e9_bold.nii.gz")),
    Case("space", "file name with a space", "failed", r"not a BIDS|BIDS name", _name(lambda s: f"{s}_acq-a b_bold.nii.gz")),
)


def build_dataset(root: Path, cases: tuple[Case, ...] = CASES) -> dict[str, Path]:
    """A BIDS dataset with two good inputs (``sub-good4d``, ``sub-good3d``) and one participant per
    case; returns case id → input path."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "corpus", "BIDSVersion": "1.10.0"}))
    (root / "task-rest_bold.json").write_text(json.dumps({"TaskName": "rest"}))
    (root / "participants.tsv").write_text("participant_id\n")
    good = root / "sub-good4d" / "func"
    good.mkdir(parents=True)
    nib.save(real_run(), good / "sub-good4d_task-rest_bold.nii.gz")
    good3d = root / "sub-good3d" / "func"
    good3d.mkdir(parents=True)
    (good3d / "sub-good3d_task-rest_rec-MoCoMean_bold.nii.gz").write_bytes(LEIPZIG.read_bytes())
    paths = {}
    for case in cases:
        folder = root / f"sub-{case.id}" / "func"
        folder.mkdir(parents=True)
        paths[case.id] = case.build(folder, f"sub-{case.id}_task-rest")
    return paths
