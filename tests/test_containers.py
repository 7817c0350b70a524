"""The container images' contract, enforced on the host (no container engine runs in CI).

Static: ``Dockerfile`` and ``Singularity.def`` install the same way (pip command and constraints
file, model URL and name, ``EPISEG_MODEL_DIR``), run the same entrypoint and carry the package
version in their labels.

Runtime: the Dockerfile's own ``COPY`` and ``RUN`` lines (parsed from it, so test and image cannot
drift) install the package into a fresh venv and the demo model into ``EPISEG_HOME``; then the
Docker usage line ``IMAGE /data /out participant`` (and the group level) runs with the image's
``ENV`` as a non-root user in a mount and network namespace that mimics
``docker run --read-only --tmpfs /tmp --network none --user U -v DS:/data:ro -v OUT:/out``:
read-only root filesystem and input, unwritable ``$HOME``, writable ``/tmp`` and output only.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import DEMO_MODEL, EXAMPLE, REPO
from episeg_bids import __version__
from episeg_bids.model import EPISEG_NAME, EPISEG_URL
from episeg_bids.validate import run_validator

DOCKERFILE = REPO / "Dockerfile"
DEFINITION = REPO / "Singularity.def"
DEMO_ZIP = DEMO_MODEL / "episeg-demo-model.zip"
#: Image paths and where the runtime test puts them on the host (longest first).
IMAGE_SRC = "/opt/episeg-bids/src"
IMAGE_HOME = "/opt/episeg"
TEST_USER = "episeg-ci"


# --------------------------------------------------------------------------- parsing

@dataclass
class Step:
    """A COPY or RUN instruction with the WORKDIR and ENV in effect at that point."""

    args: str
    workdir: str
    env: dict[str, str]


@dataclass
class Dockerfile:
    """The instructions of a single-stage Dockerfile, ``${VAR}`` substituted where Docker does."""

    base: str = ""
    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    copies: list[Step] = field(default_factory=list)
    runs: list[Step] = field(default_factory=list)
    workdir: str = "/"
    user: str = "root"
    entrypoint: list[str] = field(default_factory=list)


def _substitute(text: str, values: dict[str, str]) -> str:
    """Docker's ``$VAR`` / ``${VAR}`` substitution (in ENV, LABEL, FROM, WORKDIR, COPY)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), ""), text)


def _pairs(text: str) -> dict[str, str]:
    """``K=V K2="V 2"`` as a dict."""
    return dict(token.split("=", 1) for token in shlex.split(text))


def parse_dockerfile(path: Path, build_args: dict[str, str] | None = None) -> Dockerfile:
    """Parse the instructions this project uses (ARG, FROM, LABEL, ENV, WORKDIR, COPY, RUN, USER,
    ENTRYPOINT); comment lines are dropped, continuation lines joined; `build_args` override ARG
    defaults as ``docker build --build-arg`` does."""
    logical, current = [], ""
    for raw in path.read_text().splitlines():
        if raw.strip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        logical.append(current.strip())
        current = ""
    image = Dockerfile()
    for line in logical:
        keyword, rest = line.split(None, 1)
        keyword = keyword.upper()
        values = {**image.args, **image.env}
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            image.args[name] = (build_args or {}).get(name, shlex.split(default)[0] if default else "")
        elif keyword == "FROM":
            image.base = _substitute(rest, values)
        elif keyword == "LABEL":
            image.labels.update({k: _substitute(v, values) for k, v in _pairs(rest).items()})
        elif keyword == "ENV":
            for key, value in _pairs(rest).items():
                image.env[key] = _substitute(value, {**image.args, **image.env})
        elif keyword == "WORKDIR":
            image.workdir = str(Path(image.workdir, _substitute(rest, values)))
        elif keyword == "COPY":
            image.copies.append(Step(rest, image.workdir, dict(image.env)))
        elif keyword == "RUN":
            image.runs.append(Step(rest, image.workdir, dict(image.env)))
        elif keyword == "USER":
            image.user = rest
        elif keyword == "ENTRYPOINT":
            image.entrypoint = json.loads(rest)
    return image


@dataclass
class Definition:
    """An Apptainer definition file with its ``{{ ARG }}`` templates filled in."""

    header: dict[str, str]
    sections: dict[str, str]
    arguments: dict[str, str]

    @property
    def environment(self) -> dict[str, str]:
        lines = [ln.strip() for ln in self.sections.get("environment", "").splitlines()]
        return {k: v for ln in lines if ln.startswith("export ") for k, v in _pairs(ln[len("export "):]).items()}

    @property
    def labels(self) -> dict[str, str]:
        lines = [ln.strip() for ln in self.sections.get("labels", "").splitlines() if ln.strip()]
        return dict(ln.split(None, 1) for ln in lines)

    def commands(self, section: str) -> list[str]:
        """Non-comment lines of a scriptlet section."""
        return [ln.strip() for ln in self.sections.get(section, "").splitlines()
                if ln.strip() and not ln.strip().startswith("#")]


def parse_definition(path: Path) -> Definition:
    """Header, sections and ``%arguments`` defaults, the ``{{ NAME }}`` templates filled in as
    ``apptainer build`` does without --build-arg."""
    text = path.read_text()
    arguments_text = re.search(r"^%arguments\n(.*?)(?=^%|\Z)", text, re.M | re.S)
    arguments = {}
    for line in (arguments_text.group(1) if arguments_text else "").splitlines():
        if "=" in line and not line.strip().startswith("#"):
            name, value = line.strip().split("=", 1)
            arguments[name] = value
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: arguments[m.group(1)], text)
    head, *parts = re.split(r"^%(\w+)[^\n]*\n", text, flags=re.M)
    header = dict(ln.split(":", 1) for ln in head.splitlines() if ":" in ln and not ln.startswith("#"))
    sections = {name: body for name, body in zip(parts[::2], parts[1::2])}
    return Definition({k.strip(): v.strip() for k, v in header.items()}, sections, arguments)


def run_segments(run: str) -> list[str]:
    """The ``&&``-separated commands of a RUN instruction."""
    return [part.strip() for part in re.split(r"\s&&\s", run)]


def pip_command(commands: list[str]) -> list[str]:
    found = [shlex.split(c) for c in commands if re.match(r"^(python3? -m )?pip install\b", c)]
    assert len(found) == 1, f"expected one 'pip install' command, found {found}"
    return found[0]


def install_model_command(commands: list[str]) -> str:
    found = [" ".join(c.split()) for c in commands if c.startswith("episeg-bids install-model")]
    assert len(found) == 1, f"expected one 'episeg-bids install-model' command, found {found}"
    return found[0]


@pytest.fixture(scope="module")
def docker() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE)


@pytest.fixture(scope="module")
def definition() -> Definition:
    return parse_definition(DEFINITION)


# --------------------------------------------------------------------------- static contract

def docker_commands(docker: Dockerfile) -> list[str]:
    return [c for run in docker.runs for c in run_segments(run.args)]


def test_both_images_install_with_the_ci_pins(docker, definition):
    assert pip_command(docker_commands(docker)) == ["pip", "install", "-c", "constraints.txt", "."]
    assert pip_command(definition.commands("post")) == pip_command(docker_commands(docker))
    assert "-c constraints.txt ." in (REPO / "Makefile").read_text(), "CI (make setup) must use the same pins"
    # the same sources copied to the same place, where pip runs
    apptainer_files = {Path(src).name: dest for src, dest in (ln.split() for ln in definition.commands("files"))}
    assert dict(target for step in docker.copies for target in copy_targets(step)) == apptainer_files
    pip_run = next(run for run in docker.runs if "pip install" in run.args)
    assert pip_run.workdir == IMAGE_SRC and f"cd {IMAGE_SRC}" in definition.commands("post")
    assert docker.args["PYTHON_IMAGE"] == definition.arguments["PYTHON_IMAGE"] == docker.base
    assert definition.header["From"] == docker.base and definition.header["Bootstrap"] == "docker"


def test_both_images_bake_the_same_model(docker, definition):
    line = install_model_command(docker_commands(docker))
    assert line == install_model_command(definition.commands("post"))
    assert '--url "${EPISEG_MODEL_URL}"' in line and '--name "${EPISEG_MODEL_NAME}"' in line
    assert '${EPISEG_MODEL_SHA256:+--sha256 "${EPISEG_MODEL_SHA256}"}' in line
    for name in ("EPISEG_MODEL_URL", "EPISEG_MODEL_NAME", "EPISEG_MODEL_SHA256", "TORCH_INDEX_URL"):
        assert docker.args[name] == definition.arguments[name], name
    assert docker.args["EPISEG_MODEL_URL"] == EPISEG_URL and docker.args["EPISEG_MODEL_NAME"] == EPISEG_NAME
    environment = definition.environment
    for name in ("EPISEG_HOME", "EPISEG_MODEL_DIR", "EPISEG_WORK_DIR", "XDG_CACHE_HOME", "MPLCONFIGDIR", "DENO_DIR"):
        assert docker.env[name] == environment[name], name
    assert docker.env["EPISEG_MODEL_DIR"] == f"{docker.env['EPISEG_HOME']}/models/{EPISEG_NAME}"
    # nothing at run time needs a writable image or $HOME
    for name in ("EPISEG_WORK_DIR", "XDG_CACHE_HOME", "MPLCONFIGDIR", "DENO_DIR"):
        assert docker.env[name].startswith("/tmp/"), name


def test_both_images_run_the_bids_app_entrypoint(docker, definition):
    scripts = (REPO / "pyproject.toml").read_text()
    assert 'episeg-bids = "episeg_bids.cli:main"' in scripts
    assert docker.entrypoint == ["episeg-bids"]
    assert definition.commands("runscript") == ['exec episeg-bids "$@"']
    assert docker.user not in ("root", "0") and not docker.user.startswith("0:")
    assert docker.env["EPISEG_CONTAINER_TYPE"] == "docker"
    assert definition.environment["EPISEG_CONTAINER_TYPE"] == "singularity"


def test_both_images_are_labelled_with_the_package_version(docker, definition):
    assert docker.labels["org.opencontainers.image.version"] == __version__
    assert definition.labels["org.opencontainers.image.version"] == __version__
    assert docker.env["EPISEG_CONTAINER_TAG"] == f"episeg-bids:{__version__}"
    assert definition.environment["EPISEG_CONTAINER_TAG"] == f"episeg-bids_{__version__}.sif"
    for key in ("title", "source", "licenses", "description"):
        assert docker.labels[f"org.opencontainers.image.{key}"] == definition.labels[f"org.opencontainers.image.{key}"]


# --------------------------------------------------------------------------- runtime contract

def _open_to_others(path: Path) -> bool:
    """True if every folder above `path` (symlinks resolved) can be entered by other users."""
    real = path.resolve()
    return real.exists() and all(p.stat().st_mode & stat.S_IXOTH for p in [real, *real.parents])


def base_python(minor: str) -> Path:
    """A Python ``minor`` (e.g. '3.11') that a non-root user may run, with venv (the image's
    Python is the base image's; this machine's pyenv Python lives under /root)."""
    candidates = [Path(getattr(sys, "_base_executable", sys.executable)), Path(sys.executable)]
    candidates += [Path(p) for p in (shutil.which(f"python{minor}"), f"/usr/bin/python{minor}",
                                     f"/usr/local/bin/python{minor}") if p]
    for candidate in candidates:
        if not candidate.exists() or not _open_to_others(candidate):
            continue
        probe = subprocess.run([str(candidate), "-c", "import sys, venv, ensurepip; print(sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == str(tuple(map(int, minor.split(".")))):
            return candidate
    pytest.fail(f"no Python {minor} with venv that other users can run (tried {[str(c) for c in candidates]}); "
                f"install it, e.g. apt-get install python{minor}-venv")


def image_path(value: str, home: Path, src: Path) -> str:
    """An image path (``/opt/episeg...``) as the runtime test's host path."""
    value = re.sub(rf"{re.escape(IMAGE_SRC)}(?![\w.-])", str(src), value)
    return re.sub(rf"{re.escape(IMAGE_HOME)}(?![\w.-])", str(home), value)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _ensure_user() -> tuple[int, int, bool]:
    """uid and gid of the unprivileged test user, creating it when missing (True if created)."""
    try:
        entry = pwd.getpwnam(TEST_USER)
        return entry.pw_uid, entry.pw_gid, False
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", TEST_USER], check=True, capture_output=True)
        entry = pwd.getpwnam(TEST_USER)
        return entry.pw_uid, entry.pw_gid, True


@dataclass
class Image:
    """The image's filesystem as the runtime test lays it out on the host."""

    root: Path            # a world-readable folder under /var/tmp, removed afterwards
    venv: Path            # stands for the image's /usr/local (the base image's Python)
    home: Path            # $EPISEG_HOME (/opt/episeg in the image)
    env: dict[str, str]   # the image's runtime ENV, paths mapped to the host
    install_seconds: float
    model_seconds: float


def copy_targets(step: Step) -> list[tuple[str, str]]:
    """``(source, path in the image)`` of a COPY: into a folder when the destination ends in '/'
    or there are several sources (a source folder's contents go to the destination)."""
    *sources, dest = shlex.split(step.args)
    into_folder = len(sources) > 1 or dest.endswith("/")
    return [(name, str(Path(step.workdir, dest, name) if into_folder else Path(step.workdir, dest)))
            for name in sources]


def copy_into_image(step: Step, home: Path, src: Path) -> None:
    """Docker's COPY of repository files into the host folders that stand for the image."""
    for name, dest in copy_targets(step):
        target = Path(image_path(dest, home, src))
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, target)


@pytest.fixture(scope="module")
def image() -> Image:
    """Build the image's contents the Dockerfile's way, with the demo model as build args: its
    COPY and RUN lines, paths under /opt mapped into a temporary folder, the image's Python
    replaced by a fresh venv, ``useradd`` left to the test."""
    if os.geteuid() != 0:
        pytest.fail("the container contract test runs as root (it creates a user, mount and network namespaces)")
    build_args = {"EPISEG_MODEL_URL": DEMO_ZIP.as_uri(), "EPISEG_MODEL_NAME": "episeg-demo",
                  "EPISEG_MODEL_SHA256": sha256(DEMO_ZIP)}
    docker = parse_dockerfile(DOCKERFILE, build_args)
    root = Path(tempfile.mkdtemp(prefix="episeg-image-", dir="/var/tmp"))
    root.chmod(0o755)
    src, home, venv = root / "src", root / "opt-episeg", root / "venv"
    try:
        for step in docker.copies:
            copy_into_image(step, home, src)
        minor = re.search(r"python:(\d+\.\d+)", docker.base).group(1)
        subprocess.run([str(base_python(minor)), "-m", "venv", str(venv)], check=True)
        seconds = []
        for run in docker.runs:
            commands = [image_path(c, home, src) for c in run_segments(run.args) if not c.startswith("useradd ")]
            env = {**os.environ, **docker.args, **{k: image_path(v, home, src) for k, v in run.env.items()},
                   "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
            env.pop("PIP_NO_CACHE_DIR", None)  # pip's cache only makes CI faster: the same wheels
            env.pop("PYTHONPATH", None)
            started = time.monotonic()
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", " && ".join(commands)],
                                  cwd=image_path(run.workdir, home, src), env=env,
                                  capture_output=True, text=True, timeout=900)
            seconds.append(time.monotonic() - started)
            assert done.returncode == 0, f"RUN {run.args!r} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        runtime_env = {k: image_path(v, home, src) for k, v in docker.env.items()}
        yield Image(root, venv, home, runtime_env, seconds[0], sum(seconds[1:]))
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class ContractRun:
    participant: subprocess.CompletedProcess
    group: subprocess.CompletedProcess
    data: Path
    out: Path
    home: Path
    uid: int
    data_before: dict[str, str]
    seconds: float


NAMESPACE_SCRIPT = r"""
set -euo pipefail
# docker run -v OUT:/out (writable) -v DS:/data:ro --read-only --tmpfs /tmp --network none
mount --bind "$OUT" "$OUT"
mount --bind "$DATA" "$DATA"
mount -o remount,bind,ro "$DATA"
mount -o remount,bind,ro /
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
as_user() { setpriv --reuid "$RUN_UID" --regid "$RUN_GID" --clear-groups --no-new-privs -- "$@"; }
fail() { echo "CONTRACT PROBE FAILED: $*" >&2; exit 90; }
# root ignores permissions, not read-only mounts
touch "$DATA/probe" 2>/dev/null && fail "the input $DATA is writable"
touch "$(dirname "$OUT")/probe" 2>/dev/null && fail "the root filesystem is writable"
as_user touch "$PROBE_HOME/probe" 2>/dev/null && fail "\$HOME $PROBE_HOME is writable"
as_user touch /tmp/probe || fail "/tmp is not writable"
as_user touch "$OUT/probe" || fail "the output $OUT is not writable"
rm -f /tmp/probe "$OUT/probe"
"$PROBE_PYTHON" -c 'import socket; socket.create_connection(("1.1.1.1", 53), 3)' 2>/dev/null \
    && fail "the network is reachable"
cd /tmp
exec setpriv --reuid "$RUN_UID" --regid "$RUN_GID" --clear-groups --no-new-privs -- "$@"
"""


def run_in_container(image: Image, uid: int, gid: int, data: Path, out: Path, home: Path,
                     *args: str) -> subprocess.CompletedProcess:
    """``episeg-bids ARGS`` with the image's ENV, as `uid`, in fresh mount and network namespaces."""
    env = {**image.env, "HOME": str(home), "PATH": f"{image.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
           "LANG": "C.UTF-8"}
    control = {"OUT": str(out), "DATA": str(data), "RUN_UID": str(uid), "RUN_GID": str(gid),
               "PROBE_HOME": str(home), "PROBE_PYTHON": str(image.venv / "bin" / "python"),
               "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    command = ["unshare", "--mount", "--net", "--propagation", "private", "--", "bash", "-c", NAMESPACE_SCRIPT,
               "namespace", "env", "-i", *[f"{k}={v}" for k, v in sorted(env.items())], "episeg-bids", *args]
    return subprocess.run(command, env=control, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def contract_run(image) -> ContractRun:
    """The demo dataset through the Docker usage line, participant then group level."""
    uid, gid, created = _ensure_user()
    data, out, home = image.root / "data", image.root / "out", image.root / "home"
    try:
        shutil.copytree(EXAMPLE, data)
        subprocess.run(["chmod", "-R", "a+rX,a-w", str(data)], check=True)
        home.mkdir(mode=0o555)
        out.mkdir()
        os.chown(out, uid, gid)
        before = manifest(data)
        started = time.monotonic()
        participant = run_in_container(image, uid, gid, data, out, home, str(data), str(out), "participant")
        group = run_in_container(image, uid, gid, data, out, home, str(data), str(out), "group",
                                 "--ground-truth", str(data / "derivatives" / "label"))
        yield ContractRun(participant, group, data, out, home, uid, before, time.monotonic() - started)
    finally:
        if created:
            subprocess.run(["userdel", TEST_USER], capture_output=True)


def test_fresh_install_takes_the_dockerfile_steps(image):
    source = json.loads((image.home / "models" / "episeg-demo" / "source.json").read_text())
    assert source["url"] == DEMO_ZIP.as_uri()
    assert source["sha256"] == sha256(DEMO_ZIP) and source["sha256_verified"] is True
    assert image.env["EPISEG_MODEL_DIR"] == str(image.home / "models" / "episeg-demo")
    assert not (image.root / "src").exists(), "the Dockerfile removes its source copy"
    mode = (image.home / "models" / "episeg-demo" / "source.json").stat().st_mode
    assert mode & stat.S_IROTH and not mode & stat.S_IWOTH
    print(f"fresh venv install {image.install_seconds:.0f} s, model install {image.model_seconds:.1f} s")


def test_participant_level_runs_as_non_root_read_only_offline(contract_run):
    done = contract_run.participant
    assert "CONTRACT PROBE FAILED" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr[-4000:]
    assert "3 done, 0 skipped, 0 failed" in done.stderr
    # no silent fallback: nothing tried to write where the image cannot, nothing crashed
    for sign in ("Permission denied", "Read-only file system", "Traceback", "ERROR"):
        assert sign not in done.stderr + contract_run.group.stderr, sign
    assert "index /tmp/episeg_work/discovery/" in done.stderr, "the work folder defaults to $EPISEG_WORK_DIR"
    masks = sorted(contract_run.out.glob("sub-*/**/*_space-orig_label-SC_mask.nii.gz"))
    assert len(masks) == 3
    for mask in masks:
        meta = json.loads(mask.with_name(mask.name.replace(".nii.gz", ".json")).read_text())
        assert meta["Model"]["Source"]["url"] == DEMO_ZIP.as_uri()
        assert meta["Model"]["Source"]["sha256"] == sha256(DEMO_ZIP)
        assert meta["Options"]["device"] == "cpu" and meta["Metrics"]["slices_with_cord"] > 0
    description = json.loads((contract_run.out / "dataset_description.json").read_text())
    assert description["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": f"episeg-bids:{__version__}"}
    print(f"participant + group level in the namespace: {contract_run.seconds:.0f} s")


def test_group_level_runs_in_the_same_contract(contract_run):
    done = contract_run.group
    assert done.returncode == 0, done.stderr[-4000:]
    with open(contract_run.out / "group_bold.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["status"] for r in rows] == ["done"] * 3
    assert json.loads((contract_run.out / "group_bold.json").read_text())["Accuracy"]["runs_with_ground_truth"] == 1


def test_nothing_is_written_outside_the_output(contract_run):
    assert manifest(contract_run.data) == contract_run.data_before
    assert list(contract_run.home.iterdir()) == []
    assert not (contract_run.out.parent / "episeg_work").exists()
    owners = {p.stat().st_uid for p in contract_run.out.rglob("*")}
    assert owners == {contract_run.uid}, "every output belongs to the container's user"


def test_outputs_pass_the_bids_validator(contract_run):
    findings = run_validator(contract_run.out)
    assert [f for f in findings if f.severity == "error"] == []
