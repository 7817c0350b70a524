"""install-model: download over real HTTP, checksum, safe extraction, atomic install.

Archives are served by a real ``http.server`` on 127.0.0.1. The download and ``locate_model``
tests install the project's demo model zip; the unsafe archives are built here: each holds a
complete model plus one hostile member, so the hostile member is the only reason to refuse it.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import threading
import zipfile
from datetime import datetime, timedelta
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from episeg_bids import __version__, install
from episeg_bids.errors import InstallError, ModelError
from episeg_bids.install import EPISEG_ARCHIVE, install_model
from episeg_bids.model import EPISEG_URL, default_model_dir, locate_model, sha256_file

REPO = Path(__file__).resolve().parents[1]
DEMO_ZIP = REPO / "models" / "demo" / "episeg-demo-model.zip"
DEMO_NAME = "episeg-demo-model"  # folder name derived from the zip's file name
TRAINER = "nnUNetTrainer__nnUNetPlans__3d_fullres"


class _CountingHandler(SimpleHTTPRequestHandler):
    """Serves files from its directory and records every requested path on the server."""

    def do_GET(self) -> None:
        self.server.requested.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args) -> None:  # keep pytest output clean
        pass


class Served:
    """A folder served over HTTP: :meth:`publish` files into it, read :attr:`requested`."""

    def __init__(self, httpd: ThreadingHTTPServer, root: Path) -> None:
        self.httpd, self.root = httpd, root

    @property
    def requested(self) -> list[str]:
        return self.httpd.requested

    def url(self, name: str) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/{name}"

    def publish(self, source: Path | bytes, name: str | None = None) -> str:
        """Copy a file (or write bytes) into the served folder; return its URL."""
        name = name or source.name
        data = source if isinstance(source, bytes) else source.read_bytes()
        (self.root / name).write_bytes(data)
        return self.url(name)


@pytest.fixture
def server(tmp_path: Path):
    root = tmp_path / "www"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_CountingHandler, directory=str(root)))
    httpd.requested = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield Served(httpd, root)
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="session")
def demo_zip() -> Path:
    if not DEMO_ZIP.is_file():
        pytest.fail(f"{DEMO_ZIP} is missing; build the demo model first (tools/demo_model)")
    return DEMO_ZIP


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def _model_members(prefix: str = TRAINER + "/") -> list[tuple[str, bytes]]:
    """A complete model in the release layout, placeholder bytes for the checkpoint."""
    return [
        (prefix + "dataset.json", b'{"labels": {"background": 0, "bold": 1}}'),
        (prefix + "plans.json", b"{}"),
        (prefix + "fold_all/checkpoint_final.pth", bytes(range(256))),
    ]


def _write_zip(path: Path, members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    """Write `members` as given: ZipInfo keeps names such as ``../x`` exactly."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(name if isinstance(name, zipfile.ZipInfo) else zipfile.ZipInfo(name), data)
    return path


def _symlink_member(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    """A member that unzip(1) would create as a symlink: Unix mode S_IFLNK, the target as data."""
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix, so external_attr's high 16 bits are st_mode
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- downloading the demo model -----------------------------------------------------------------


def test_install_with_sha256_verifies_and_records_it(server, home, demo_zip):
    url = server.publish(demo_zip)
    expected = sha256_file(demo_zip)
    logs: list[str] = []
    dest = install_model(url, sha256=expected.upper(), home=home, log=logs.append)

    assert dest == home / "models" / DEMO_NAME
    assert _listing(home / "models") == [DEMO_NAME]  # no temporary file or folder left
    spec = locate_model(dest)
    assert spec.folds == ("all",)
    assert spec.checkpoint_name == "checkpoint_final.pth"
    assert spec.trainer_folder.is_relative_to(dest.resolve())
    with zipfile.ZipFile(demo_zip) as zf:
        member = next(n for n in zf.namelist() if n.endswith("fold_all/checkpoint_final.pth"))
        assert spec.checkpoint_paths[0].read_bytes() == zf.read(member)

    text = (dest / "source.json").read_text()
    source = json.loads(text)
    assert text == json.dumps(source, indent=2, sort_keys=True) + "\n"
    assert source == spec.source
    assert source["url"] == url
    assert source["sha256"] == expected  # lower case, whatever case was given
    assert source["sha256_verified"] is True
    assert source["size_bytes"] == demo_zip.stat().st_size
    assert source["archive_name"] == demo_zip.name
    assert source["episeg_bids_version"] == __version__
    assert datetime.fromisoformat(source["installed_at"]).utcoffset() == timedelta(0)
    assert any("verified" in line for line in logs)


def test_install_without_sha256_records_it_unverified(server, home, demo_zip):
    dest = install_model(server.publish(demo_zip), home=home, log=lambda _: None)

    source = json.loads((dest / "source.json").read_text())
    assert source["sha256"] == sha256_file(demo_zip)
    assert source["sha256_verified"] is False
    assert locate_model(dest).folds == ("all",)


def test_install_from_local_path_and_file_url(home, demo_zip):
    by_path = install_model(str(demo_zip), home=home, name="by-path", log=lambda _: None)
    by_url = install_model(demo_zip.as_uri(), home=home, name="by-url", log=lambda _: None)

    for dest in (by_path, by_url):
        assert json.loads((dest / "source.json").read_text())["url"] == demo_zip.as_uri()
        assert locate_model(dest).checkpoint_name == "checkpoint_final.pth"


def test_wrong_sha256_leaves_nothing(server, home, demo_zip):
    url = server.publish(demo_zip)
    wrong = "0" * 64

    with pytest.raises(InstallError, match=f"expected {wrong}") as info:
        install_model(url, sha256=wrong, home=home, log=lambda _: None)

    assert sha256_file(demo_zip) in str(info.value)  # the checksum found is named too
    assert _listing(home / "models") == []


def test_malformed_sha256_is_refused_before_downloading(server, home, demo_zip):
    url = server.publish(demo_zip)

    with pytest.raises(InstallError, match="64 hexadecimal digits"):
        install_model(url, sha256="abc123", home=home, log=lambda _: None)
    assert server.requested == []


def test_second_install_does_not_download_again(server, home, demo_zip):
    url = server.publish(demo_zip)
    first = install_model(url, home=home, log=lambda _: None)
    assert len(server.requested) == 1
    logs: list[str] = []

    second = install_model(url, sha256=sha256_file(demo_zip), home=home, log=logs.append)

    assert second == first
    assert len(server.requested) == 1
    assert any("already installed" in line for line in logs)


def test_installed_model_with_another_checksum_is_not_reused(server, home, demo_zip):
    url = server.publish(demo_zip)
    dest = install_model(url, home=home, log=lambda _: None)

    with pytest.raises(InstallError, match="pass --force"):
        install_model(url, sha256="a" * 64, home=home, log=lambda _: None)

    assert len(server.requested) == 1
    assert locate_model(dest).source["sha256"] == sha256_file(demo_zip)


def test_force_reinstalls(server, home, demo_zip):
    url = server.publish(demo_zip)
    dest = install_model(url, home=home, log=lambda _: None)
    (dest / "stale.txt").write_text("from before")

    again = install_model(url, home=home, force=True, log=lambda _: None)

    assert again == dest
    assert len(server.requested) == 2
    assert not (dest / "stale.txt").exists()
    assert locate_model(dest).folds == ("all",)
    assert _listing(home / "models") == [DEMO_NAME]


def test_folder_without_a_model_is_replaced(server, home, demo_zip):
    broken = home / "models" / DEMO_NAME
    broken.mkdir(parents=True)
    (broken / "partial.bin").write_bytes(b"\0")

    dest = install_model(server.publish(demo_zip), home=home, log=lambda _: None)

    assert len(server.requested) == 1
    assert not (dest / "partial.bin").exists()
    assert locate_model(dest).checkpoint_name == "checkpoint_final.pth"


# --- archives built here: layouts and hostile members -------------------------------------------


def test_zip_without_trainer_folder_wrapper_installs(server, home, tmp_path):
    # The EPISeg release once shipped dataset.json etc. at the top of the zip (REFERENCE §1).
    archive = _write_zip(tmp_path / "flat.zip", _model_members(prefix=""))

    dest = install_model(server.publish(archive), home=home, log=lambda _: None)

    assert dest == home / "models" / "flat"
    spec = locate_model(dest)
    assert spec.trainer_folder == dest.resolve()
    assert spec.source["archive_name"] == "flat.zip"


@pytest.mark.parametrize(
    "hostile",
    [
        "../evil.txt",
        "../../../../evil.txt",  # from home/models/<tmp>/<staging> up to the parent of home
        f"{TRAINER}/../../../../../evil.txt",
        "..\\..\\..\\..\\evil.txt",
        "{tmp}/absolute/evil.txt",
        "C:/evil.txt",
    ],
)
def test_path_escaping_member_is_refused(server, home, tmp_path, hostile):
    name = hostile.replace("{tmp}", str(tmp_path))
    archive = _write_zip(tmp_path / "hostile.zip", _model_members() + [(name, b"pwned")])
    assert name in zipfile.ZipFile(archive).namelist()  # the hostile name is really in the zip

    with pytest.raises(InstallError, match="unsafe member") as info:
        install_model(server.publish(archive), home=home, log=lambda _: None)

    assert repr(name) in str(info.value)
    assert sorted(p.name for p in tmp_path.rglob("evil.txt")) == []
    assert not (tmp_path / "absolute").exists()
    assert _listing(home / "models") == []


def test_symlink_member_is_refused(server, home, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    link = f"{TRAINER}/link"
    archive = _write_zip(
        tmp_path / "symlink.zip",
        _model_members() + [_symlink_member(link, str(outside)), (f"{link}/evil.txt", b"pwned")],
    )

    with pytest.raises(InstallError, match="symbolic link") as info:
        install_model(server.publish(archive), home=home, log=lambda _: None)

    assert repr(link) in str(info.value)
    assert _listing(outside) == []
    assert _listing(home / "models") == []


def test_archive_unpacking_beyond_the_size_limit_is_refused(server, home, tmp_path, monkeypatch):
    # 4 kB of zeros compress to a few bytes: a zip bomb in miniature, against a 2 kB limit.
    monkeypatch.setattr(install, "MAX_BYTES", 2048)
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in _model_members():
            zf.writestr(name, data)
        zf.writestr("zeros.bin", bytes(4096))
    assert archive.stat().st_size < 2048

    with pytest.raises(InstallError, match="zip bomb"):
        install_model(server.publish(archive), home=home, log=lambda _: None)
    assert _listing(home / "models") == []


def test_non_zip_is_refused(server, home):
    url = server.publish(b"<html><body>Not Found</body></html>", "model.zip")

    with pytest.raises(InstallError, match="model.zip .* is not a zip archive"):
        install_model(url, home=home, log=lambda _: None)
    assert _listing(home / "models") == []


def test_zip_without_model_is_refused(server, home, tmp_path):
    archive = _write_zip(tmp_path / "notes.zip", [("README.txt", b"no weights here")])

    with pytest.raises(InstallError, match="no usable nnUNetv2 model.*README.txt"):
        install_model(server.publish(archive), home=home, log=lambda _: None)
    assert _listing(home / "models") == []


def test_unreachable_url_names_it(home):
    url = f"http://127.0.0.1:{_closed_port()}/model.zip"

    with pytest.raises(InstallError, match="check the network connection") as info:
        install_model(url, home=home, log=lambda _: None)

    assert url in str(info.value)
    assert "\n" not in str(info.value)
    assert _listing(home / "models") == []


def test_missing_file_on_server_names_http_status(server, home):
    url = server.url("nope.zip")

    with pytest.raises(InstallError, match="HTTP 404") as info:
        install_model(url, home=home, log=lambda _: None)
    assert url in str(info.value)
    assert _listing(home / "models") == []


# --- the command line -----------------------------------------------------------------------------


def _run_cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    """``episeg-bids install-model`` with EPISEG_HOME=home and no EPISEG_MODEL_DIR."""
    env = {k: v for k, v in os.environ.items() if k != "EPISEG_MODEL_DIR"}
    env.update(EPISEG_HOME=str(home), PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "episeg_bids.cli", "install-model", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


def test_cli_installs_and_prints_the_folder(server, home, demo_zip):
    url = server.publish(demo_zip)

    proc = _run_cli(home, "--url", url, "--sha256", sha256_file(demo_zip))

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(home / "models" / DEMO_NAME)
    assert locate_model(home / "models" / DEMO_NAME).source["sha256_verified"] is True


def test_cli_reports_a_checksum_mismatch_on_one_line(server, home, demo_zip):
    url = server.publish(demo_zip)

    proc = _run_cli(home, "--url", url, "--sha256", "f" * 64)

    assert proc.returncode == 1
    assert any(url in line and "expected " + "f" * 64 in line for line in proc.stderr.splitlines())
    assert _listing(home / "models") == []


# --- where the app looks --------------------------------------------------------------------------


@pytest.fixture
def app_home(home: Path, monkeypatch) -> Path:
    """EPISEG_HOME set to `home` and no EPISEG_MODEL_DIR: the app looks in home/models/episeg-v0.2."""
    monkeypatch.setenv("EPISEG_HOME", str(home))
    monkeypatch.delenv("EPISEG_MODEL_DIR", raising=False)
    return home


@pytest.fixture
def episeg_named_zip(tmp_path: Path, demo_zip: Path) -> Path:
    """A copy of the demo zip under the EPISeg release's file name (as a mirror or a download would be)."""
    copy = tmp_path / "downloads" / EPISEG_ARCHIVE
    copy.parent.mkdir()
    shutil.copyfile(demo_zip, copy)
    return copy


def test_the_release_file_name_is_the_one_of_the_episeg_url():
    assert EPISEG_ARCHIVE == "model-fmri-segmentation-v0.2_nnUNetTrainer.zip"
    assert EPISEG_URL.endswith("/" + EPISEG_ARCHIVE)


@pytest.mark.parametrize("how", ["http", "http-with-query", "path", "file-url"])
def test_copy_of_the_episeg_release_installs_where_the_app_looks(server, app_home, episeg_named_zip, how):
    url = {
        "http": lambda: server.publish(episeg_named_zip),
        "http-with-query": lambda: server.publish(episeg_named_zip) + "?download=1",
        "path": lambda: str(episeg_named_zip),
        "file-url": lambda: episeg_named_zip.as_uri(),
    }[how]()
    logs: list[str] = []

    dest = install_model(url, log=logs.append)

    assert dest == default_model_dir() == app_home / "models" / "episeg-v0.2"
    assert locate_model(None).trainer_folder.is_relative_to(dest.resolve())  # found without --model-dir
    assert logs[-1] == f"episeg-bids uses {dest} by default: no --model-dir needed"


def test_other_archive_ends_with_the_exact_model_dir_to_pass(server, app_home, demo_zip):
    url = server.publish(demo_zip)
    logs: list[str] = []

    dest = install_model(url, log=logs.append)

    assert dest == app_home / "models" / DEMO_NAME
    path = shlex.quote(str(dest))
    assert logs[-1] == (f"episeg-bids looks in {default_model_dir()} by default; to use this model pass "
                        f"--model-dir {path} (or set EPISEG_MODEL_DIR={path})")
    with pytest.raises(ModelError, match="install-model"):
        locate_model(None)  # indeed not found by default
    assert locate_model(dest).folds == ("all",)
    again: list[str] = []
    install_model(url, log=again.append)  # already installed: the same last word
    assert again[-1] == logs[-1]


def test_hint_quotes_a_path_with_spaces(tmp_path, monkeypatch, demo_zip):
    home = tmp_path / "my home"
    monkeypatch.setenv("EPISEG_HOME", str(home))
    monkeypatch.delenv("EPISEG_MODEL_DIR", raising=False)
    logs: list[str] = []

    dest = install_model(str(demo_zip), log=logs.append)

    assert shlex.split(logs[-1].split("--model-dir ", 1)[1])[0] == str(dest)


def test_episeg_model_dir_pointing_elsewhere_is_named(app_home, episeg_named_zip, monkeypatch, tmp_path):
    monkeypatch.setenv("EPISEG_MODEL_DIR", str(tmp_path / "elsewhere"))
    logs: list[str] = []

    dest = install_model(str(episeg_named_zip), log=logs.append)

    assert dest == app_home / "models" / "episeg-v0.2"
    assert logs[-1].startswith(f"EPISEG_MODEL_DIR is set to {tmp_path / 'elsewhere'}; ")
    assert f"--model-dir {shlex.quote(str(dest))}" in logs[-1]


def test_cli_installs_a_release_copy_for_the_app_and_says_so(server, home, episeg_named_zip, demo_zip):
    release = _run_cli(home, "--url", server.publish(episeg_named_zip))
    other = _run_cli(home, "--url", str(demo_zip))

    assert release.returncode == 0, release.stderr
    assert release.stdout.strip().splitlines()[-1] == str(home / "models" / "episeg-v0.2")
    assert "no --model-dir needed" in release.stderr.strip().splitlines()[-1]
    assert other.returncode == 0, other.stderr
    dest = home / "models" / DEMO_NAME
    assert other.stdout.strip().splitlines()[-1] == str(dest)
    assert other.stderr.strip().splitlines()[-1].endswith(
        f"--model-dir {shlex.quote(str(dest))} (or set EPISEG_MODEL_DIR={shlex.quote(str(dest))})")
