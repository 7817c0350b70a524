"""Download an nnUNetv2 model release zip into the episeg-bids cache (``install-model``).

The archive is streamed into a temporary folder inside ``$EPISEG_HOME/models`` (so the final
rename stays on one filesystem) while its SHA-256 is computed; it is checked against ``--sha256``
when one is given, extracted member by member into a staging folder that refuses anything that
could land outside it (absolute names, drive letters, ``..``, symlinks), checked to hold an
nnUNetv2 model folder, stamped with ``source.json``, and only then renamed to its final name.
A failure at any step leaves ``$EPISEG_HOME/models`` as it was::

    $EPISEG_HOME/models/episeg-v0.2/
        source.json                        (url, sha256 of the archive, ...)
        nnUNetTrainer__nnUNetPlans__3d_fullres/
            dataset.json  plans.json  fold_all/checkpoint_final.pth

A zip with the EPISeg release's file name (``model-fmri-segmentation-v0.2_nnUNetTrainer.zip``),
wherever it comes from (the release, a mirror, a local copy), goes to ``episeg-v0.2``, where the app
looks by default (:func:`episeg_bids.model.default_model_dir`); any other archive goes to a folder
named after it, and the last message gives the exact ``--model-dir`` to pass.

The EPISeg release zip once shipped without its trainer folder (REFERENCE §1, "packaging
fragility"); :func:`episeg_bids.model.find_trainer_folder` accepts both layouts.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shlex
import stat
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable

from . import __version__
from .errors import InstallError, ModelError
from .model import (
    EPISEG_NAME, EPISEG_URL, default_home, find_checkpoint_name, find_folds, find_trainer_folder,
    resolve_model_dir,
)

#: File name of the EPISeg release zip; an archive with this name is installed as EPISeg.
EPISEG_ARCHIVE = EPISEG_URL.rsplit("/", 1)[-1]

#: Seconds to wait for the server to connect or to send the next bytes.
TIMEOUT_S = 60.0
#: Refuse downloads and extracted contents larger than this (a zip-bomb guard; EPISeg is ~0.1 GB).
MAX_BYTES = 5 * 1024**3
CHUNK_BYTES = 1 << 20

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_NETWORK_HINT = (
    "check the network connection and proxy settings (HTTPS_PROXY), or download the zip on "
    "another machine and pass its path with --url"
)


def install_model(
    url: str = EPISEG_URL,
    *,
    sha256: str | None = None,
    home: Path | None = None,
    name: str | None = None,
    force: bool = False,
    log: Callable[[str], Any] = print,
) -> Path:
    """Download the release zip at `url` into the cache and return the installed model folder.

    Parameters
    ----------
    url : str
        ``https://``, ``http://`` or ``file://`` URL of an nnUNetv2 model zip, or a local path
        to one. Defaults to the EPISeg v0.2 release.
    sha256 : str, optional
        Expected hex SHA-256 of the zip (any case). The checksum is always computed and recorded
        in ``source.json``; it is only verified when given.
    home : Path, optional
        Cache folder; default :func:`episeg_bids.model.default_home` (``$EPISEG_HOME``, ...).
    name : str, optional
        Folder name under ``home/models``. Default ``episeg-v0.2`` for an archive named as the
        EPISeg release (:data:`EPISEG_ARCHIVE`), from any URL or path; else the zip's file name
        without ``.zip``.
    force : bool
        Download and replace the folder even if it already holds a model.
    log : callable
        Receives one-line progress messages; the last one says whether episeg-bids uses the
        model by default or gives the exact ``--model-dir`` (or ``EPISEG_MODEL_DIR``) to pass.

    Returns
    -------
    Path
        ``home/models/<name>``, holding ``source.json`` and the model; pass it to
        :func:`episeg_bids.model.locate_model` or ``--model-dir``.

    Raises
    ------
    InstallError
        On a bad ``sha256`` or ``name``, a network error, a checksum mismatch, an archive that is
        not a zip, is unsafe or too large, or holds no nnUNetv2 model. Nothing is left behind.
        Also when the folder already holds a model whose recorded checksum differs from
        ``sha256`` (and not ``force``): it is neither reused nor silently replaced.
    """
    expected = _check_sha256(sha256)
    url = _normalise_url(url)
    archive_name = _archive_name(url)
    label = f"{archive_name} from {url}"
    models = Path(home or default_home()) / "models"
    default_name = EPISEG_NAME if archive_name == EPISEG_ARCHIVE else _derive_name(archive_name, url)
    dest = models / _check_name(name or default_name)
    if _can_reuse(dest, expected, force, log):
        log(how_to_use(dest))
        return dest
    _make_dir(models)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.install-", dir=models) as work:
        archive, staging = Path(work) / "archive.zip", Path(work) / "model"
        log(f"downloading {url} into {dest}")
        found, size_bytes = download(url, archive)
        if expected and found != expected:
            raise InstallError(
                f"{label} has sha256 {found}, expected {expected}; the download is corrupt or the "
                "file changed: check --url and --sha256"
            )
        log(f"sha256 {found} ({'verified' if expected else 'not verified: pass --sha256 to check it'})")
        extract_zip_safely(archive, staging, label=label)
        _check_model(staging, label)
        _write_json(staging / "source.json", {
            "url": url,
            "sha256": found,
            "sha256_verified": expected is not None,
            "size_bytes": size_bytes,
            "installed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "episeg_bids_version": __version__,
            "archive_name": archive_name,
        })
        _move_into_place(staging, dest, Path(work) / "previous")
    log(f"installed {dest}")
    log(how_to_use(dest))
    return dest


def how_to_use(dest: Path) -> str:
    """One line: episeg-bids finds `dest` by default, or the exact option to pass.

    Compares `dest` with where the app looks without ``--model-dir``
    (:func:`episeg_bids.model.resolve_model_dir`: ``$EPISEG_MODEL_DIR``, else the default install
    folder of the EPISeg weights).
    """
    looks_in = resolve_model_dir(None)
    if Path(dest).resolve() == looks_in.resolve():
        return f"episeg-bids uses {dest} by default: no --model-dir needed"
    where = (f"EPISEG_MODEL_DIR is set to {looks_in}" if os.environ.get("EPISEG_MODEL_DIR")
             else f"episeg-bids looks in {looks_in} by default")
    path = shlex.quote(str(dest))
    return f"{where}; to use this model pass --model-dir {path} (or set EPISEG_MODEL_DIR={path})"


def _can_reuse(dest: Path, expected: str | None, force: bool, log: Callable[[str], Any]) -> bool:
    """True if `dest` already holds the model asked for and may be returned as it is."""
    if not (dest.exists() or dest.is_symlink()):
        return False
    if not force and _holds_model(dest):
        _check_recorded_sha256(dest, expected)
        log(f"model already installed in {dest} (pass --force to download it again)")
        return True
    log(f"replacing {dest}" + ("" if force else ", which holds no complete model"))
    return False


def download(url: str, path: Path, *, timeout_s: float = TIMEOUT_S) -> tuple[str, int]:
    """Stream `url` into the new file `path` and return its hex SHA-256 and size in bytes.

    Parameters
    ----------
    url : str
        ``http(s)://`` or ``file://`` URL; redirects are followed.
    path : Path
        File to create; it must not exist.
    timeout_s : float
        Seconds to wait for the connection and for each chunk.

    Returns
    -------
    sha256 : str
        Lower-case hex digest of the bytes received.
    size_bytes : int

    Raises
    ------
    InstallError
        On any network or HTTP error, a truncated download, more than :data:`MAX_BYTES`, or a
        file that cannot be written; the message names the URL and what to do.
    """
    digest, size_bytes = hashlib.sha256(), 0
    request = urllib.request.Request(url, headers={"User-Agent": f"episeg-bids/{__version__}"})
    with _open_url(request, url, timeout_s) as response, _create(path) as out:
        announced = response.headers.get("Content-Length")
        while chunk := _read_chunk(response, url):
            size_bytes += len(chunk)
            if size_bytes > MAX_BYTES:
                raise InstallError(
                    f"{url} is larger than {MAX_BYTES} bytes; this is not a model zip, check --url"
                )
            digest.update(chunk)
            _write(out, chunk, path)
    if announced and announced.isdigit() and int(announced) != size_bytes:
        raise InstallError(
            f"download of {url} stopped after {size_bytes} of {announced} bytes; try again ({_NETWORK_HINT})"
        )
    return digest.hexdigest(), size_bytes


def extract_zip_safely(archive: Path, target: Path, *, label: str | None = None) -> None:
    """Extract every member of `archive` into the new folder `target`, refusing unsafe members.

    Unlike ``ZipFile.extractall``, which silently rewrites dangerous names, any member whose
    name is absolute, starts with a drive letter, has a ``..`` component or resolves outside
    `target`, any symlink or other special file, any duplicate name, and a total size above
    :data:`MAX_BYTES` (declared or actually decompressed) make the whole archive fail.
    File permissions in the archive are ignored.

    Parameters
    ----------
    archive : Path
        The zip file.
    target : Path
        Folder to create and fill; its parent must exist.
    label : str, optional
        How error messages name the archive (default: its file name).

    Raises
    ------
    InstallError
        Naming the archive and the offending member.
    """
    label = label or archive.name
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            _check_declared_size(members, label)
            target.mkdir()
            budget = [MAX_BYTES]
            for info in members:
                _extract_member(zf, info, _member_path(info, target, label), label, budget)
    except zipfile.BadZipFile as err:
        raise InstallError(
            f"{label} is not a zip archive ({err}); check that --url points to the model .zip"
        ) from None


def _extract_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, archive: str, budget: list[int]
) -> None:
    """Write one checked member to `path`; ``budget[0]`` is the number of bytes still allowed."""
    try:
        if info.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(path, "xb") as out:
            while chunk := src.read(CHUNK_BYTES):
                budget[0] -= len(chunk)
                if budget[0] < 0:
                    raise InstallError(
                        f"{archive} unpacks to more than {MAX_BYTES} bytes; refusing it as a zip bomb"
                    )
                out.write(chunk)
    except (FileExistsError, NotADirectoryError):
        raise InstallError(
            f"{archive} holds member {info.filename!r} twice, or as both a file and a folder; "
            "the archive is malformed"
        ) from None
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError, zlib.error, OSError) as err:
        raise InstallError(
            f"{archive}: cannot extract member {info.filename!r} ({err}); the archive is damaged, "
            "encrypted or uses an unsupported compression"
        ) from err


def _member_path(info: zipfile.ZipInfo, target: Path, archive: str) -> Path:
    """Where member `info` goes inside `target`, or InstallError if it would escape it."""
    name = info.filename
    path = target.joinpath(*PurePosixPath(name.replace("\\", "/")).parts)
    unsafe = _unsafe_reason(info)
    if not unsafe and not path.resolve().is_relative_to(target.resolve()):
        unsafe = "it resolves outside the extraction folder"
    if unsafe:
        raise InstallError(
            f"{archive} holds unsafe member {name!r} ({unsafe}); refusing to extract this archive"
        )
    return path


def _unsafe_reason(info: zipfile.ZipInfo) -> str | None:
    """Why member `info` must not be extracted, or None if it may."""
    mode = info.external_attr >> 16  # Unix st_mode, 0 for archives made elsewhere
    kind = stat.S_IFMT(mode)
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        return "a special file"
    posix = info.filename.replace("\\", "/")
    if posix.startswith("/"):
        return "an absolute path"
    if _DRIVE_RE.match(posix):
        return "a drive letter"
    if ".." in PurePosixPath(posix).parts:
        return "a '..' component"
    if not PurePosixPath(posix).parts and not info.is_dir():
        return "an empty name"
    return None


def _check_declared_size(members: list[zipfile.ZipInfo], archive: str) -> None:
    total = sum(info.file_size for info in members)
    if total > MAX_BYTES:
        raise InstallError(
            f"{archive} declares {total} bytes uncompressed (limit {MAX_BYTES}); refusing it as a zip bomb"
        )


def _check_model(folder: Path, what: str) -> None:
    """InstallError saying `what` holds no model unless `folder` holds a complete model."""
    try:
        _find_model(folder)
    except ModelError as err:
        raise InstallError(
            f"{what} holds no usable nnUNetv2 model: {_detail(err, folder)} (top level: "
            f"{_top_level(folder)}); check that --url points to an nnUNetv2 model release zip"
        ) from None


def _holds_model(folder: Path) -> bool:
    """True if `folder` holds a complete model."""
    try:
        _find_model(folder)
    except ModelError:
        return False
    return True


def _find_model(folder: Path) -> Path:
    """Trainer folder inside `folder`, with its folds and checkpoints; ModelError otherwise."""
    trainer_folder = find_trainer_folder(folder)
    find_checkpoint_name(trainer_folder, find_folds(trainer_folder))
    return trainer_folder


def _check_recorded_sha256(dest: Path, expected: str | None) -> None:
    """Refuse to reuse `dest` when it records an archive other than the one asked for."""
    if expected is None:
        return
    try:
        recorded = json.loads((dest / "source.json").read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded != expected:
        raise InstallError(
            f"{dest} already holds a model from an archive with sha256 {recorded or 'unknown'}, "
            f"not {expected}; pass --force to replace it, or --name to install beside it"
        )


def _move_into_place(staging: Path, dest: Path, previous: Path) -> None:
    """Rename `staging` to `dest`; an existing `dest` is first moved to `previous` (deleted later)."""
    replaced = dest.exists() or dest.is_symlink()
    try:
        if replaced:
            os.rename(dest, previous)
        os.rename(staging, dest)
    except OSError as err:
        if replaced and previous.exists() and not dest.exists():
            os.rename(previous, dest)
        raise InstallError(
            f"cannot move the new model into {dest} ({err}); remove that folder and try again"
        ) from err


def _write_json(path: Path, record: dict[str, Any]) -> None:
    """Write `record` with sorted keys through a temporary file renamed over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _check_sha256(sha256: str | None) -> str | None:
    """Lower-case hex of `sha256`, or InstallError if it is not 64 hex digits."""
    if sha256 is None:
        return None
    hex_digits = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", hex_digits):
        raise InstallError(
            f"--sha256 {sha256!r} is not a SHA-256 checksum; expected 64 hexadecimal digits"
        )
    return hex_digits


def _check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise InstallError(
            f"--name {name!r} is not a plain folder name; use letters, digits, '.', '_', '+' or '-', "
            "not starting with '.' or '-'"
        )
    return name


def _normalise_url(url: str) -> str:
    """`url` itself for http(s)/file URLs; a ``file://`` URL for a local path."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https", "file"):
        return url
    if scheme and not _DRIVE_RE.match(url):
        raise InstallError(
            f"--url {url} uses the unsupported scheme {scheme!r}; use https://, http://, file:// "
            "or a local path"
        )
    path = Path(url).expanduser()
    if not path.is_file():
        raise InstallError(f"--url {url}: no such file; give the path to a model .zip or an https:// URL")
    return path.resolve().as_uri()


def _archive_name(url: str) -> str:
    """Last component of the URL's path, e.g. ``model-fmri-segmentation-v0.2_nnUNetTrainer.zip``."""
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path).rstrip("/").rsplit("/", 1)[-1]


def _derive_name(archive_name: str, url: str) -> str:
    """Folder name from the archive's file name: ``.zip`` removed, odd characters replaced by ``-``."""
    stem = archive_name[:-4] if archive_name.lower().endswith(".zip") else archive_name
    stem = re.sub(r"[^A-Za-z0-9._+-]+", "-", stem).lstrip(".-")
    if not stem:
        raise InstallError(f"--url {url} has no file name to name the model folder after; pass --name")
    return stem


def _make_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InstallError(
            f"cannot create the model cache {folder} ({err}); set EPISEG_HOME to a writable folder"
        ) from err


def _open_url(request: urllib.request.Request, url: str, timeout_s: float) -> Any:
    """The open response (a binary file object with ``.headers``), or InstallError."""
    try:
        return urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        raise InstallError(
            f"cannot download {url}: HTTP {err.code} {err.reason}; check --url ({_NETWORK_HINT})"
        ) from None
    except urllib.error.URLError as err:
        raise InstallError(f"cannot download {url} ({err.reason}); {_NETWORK_HINT}") from None
    except (OSError, http.client.HTTPException, ValueError) as err:
        reason = err or type(err).__name__
        raise InstallError(f"cannot download {url} ({reason}); {_NETWORK_HINT}") from None


def _read_chunk(response: BinaryIO, url: str) -> bytes:
    try:
        return response.read(CHUNK_BYTES)
    except (OSError, http.client.HTTPException) as err:
        reason = err or type(err).__name__
        raise InstallError(f"download of {url} failed ({reason}); try again ({_NETWORK_HINT})") from None


def _create(path: Path) -> BinaryIO:
    try:
        return open(path, "xb")
    except OSError as err:
        raise InstallError(f"cannot create {path} ({err}); set EPISEG_HOME to a writable folder") from err


def _write(out: BinaryIO, chunk: bytes, path: Path) -> None:
    try:
        out.write(chunk)
    except OSError as err:
        raise InstallError(
            f"cannot write {path} ({err}); free some space or set EPISEG_HOME to another disk"
        ) from err


def _top_level(folder: Path) -> str:
    """Up to five names at the top of `folder`, folders marked with ``/``."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "nothing"
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def _detail(err: ModelError, folder: Path) -> str:
    """First clause of a ModelError message, the staging folder's path replaced by 'the archive'."""
    return str(err).split("; ")[0].replace(str(folder), "the archive")
