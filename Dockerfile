# episeg-bids: a CUDA-capable BIDS App image with the EPISeg weights baked in.
#
#   docker build -t episeg-bids:0.1.0 .
#   docker run --rm --gpus all --read-only --tmpfs /tmp --user "$(id -u):$(id -g)" \
#       -v /path/ds:/data:ro -v /path/out:/out episeg-bids:0.1.0 /data /out participant
#
# PyPI's torch wheels for Linux x86_64 bundle their CUDA runtime (torch 2.13.0: CUDA 13.0, which
# needs an NVIDIA driver >= 580 on the host), so a slim Python base is enough; the host needs the
# NVIDIA container toolkit for --gpus. For older drivers build against another PyTorch index, e.g.
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 ...
# Pin the weights' checksum with --build-arg EPISEG_MODEL_SHA256=<hex> (it is always recorded in
# $EPISEG_MODEL_DIR/source.json and in every mask sidecar). tests/test_containers.py checks this
# file against Singularity.def and runs its install and runtime contract on the host.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG EPISEG_VERSION=0.1.0
ARG EPISEG_MODEL_URL=https://github.com/sct-pipeline/fmri-segmentation/releases/download/v0.2/model-fmri-segmentation-v0.2_nnUNetTrainer.zip
ARG EPISEG_MODEL_NAME=episeg-v0.2
ARG EPISEG_MODEL_SHA256=
ARG TORCH_INDEX_URL=

LABEL org.opencontainers.image.title="episeg-bids" \
      org.opencontainers.image.version="${EPISEG_VERSION}" \
      org.opencontainers.image.description="EPISeg spinal-cord segmentation of EPI-BOLD fMRI as a BIDS App (nnUNetv2, run as sct_deepseg sc_epi)" \
      org.opencontainers.image.source="https://github.com/episeg-bids/episeg-bids" \
      org.opencontainers.image.licenses="MIT" \
      org.episeg-bids.model.url="${EPISEG_MODEL_URL}"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EPISEG_HOME=/opt/episeg \
    EPISEG_MODEL_DIR=/opt/episeg/models/${EPISEG_MODEL_NAME} \
    EPISEG_CONTAINER_TYPE=docker \
    EPISEG_CONTAINER_TAG="episeg-bids:${EPISEG_VERSION}"

WORKDIR /opt/episeg-bids/src
COPY pyproject.toml constraints.txt README.md run.py ./
COPY episeg_bids ./episeg_bids

# The package with the pinned versions: the same command as CI (Makefile 'setup').
RUN if [ -n "${TORCH_INDEX_URL}" ]; then export PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL}"; fi \
 && pip install -c constraints.txt . \
 && episeg-bids --version

# The weights, downloaded once at build time; source.json records the archive's URL and SHA-256.
RUN episeg-bids install-model --url "${EPISEG_MODEL_URL}" --name "${EPISEG_MODEL_NAME}" ${EPISEG_MODEL_SHA256:+--sha256 "${EPISEG_MODEL_SHA256}"} \
 && chmod -R a+rX,go-w /opt/episeg \
 && python -c "from episeg_bids.model import locate_model; print(locate_model().describe())" \
 && rm -rf /opt/episeg-bids/src \
 && useradd --uid 1000 --user-group --home-dir /home/episeg --create-home --shell /usr/sbin/nologin episeg

# Runs as a non-root user (or any --user UID:GID), with a read-only root filesystem and an
# unwritable $HOME: the discovery index defaults to $EPISEG_WORK_DIR (pass -w for a persistent
# one), caches go to /tmp (docker run --read-only --tmpfs /tmp). Nothing is downloaded at run time.
USER episeg
WORKDIR /tmp
ENV HOME=/home/episeg \
    EPISEG_WORK_DIR=/tmp/episeg_work \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    DENO_DIR=/tmp/.cache/deno

ENTRYPOINT ["episeg-bids"]
CMD ["--help"]
