# episeg-bids: CUDA-capable BIDS App image with the EPISeg weights baked in.
#   docker build -t episeg-bids:0.1.0 .
#   docker run --rm --gpus all -v /data/ds:/data:ro -v /data/out:/out episeg-bids:0.1.0 /data /out participant
# PyPI's torch wheels for Linux x86_64 ship their CUDA runtime, so a slim Python base is enough
# (the host needs an NVIDIA driver and the NVIDIA container toolkit for --gpus).
FROM python:3.11-slim

ARG EPISEG_VERSION=0.1.0
ARG EPISEG_MODEL_URL=https://github.com/sct-pipeline/fmri-segmentation/releases/download/v0.2/model-fmri-segmentation-v0.2_nnUNetTrainer.zip
# Optional: pin the archive's checksum (install-model always records it in source.json).
ARG EPISEG_MODEL_SHA256=

LABEL org.opencontainers.image.title="episeg-bids" \
      org.opencontainers.image.version="${EPISEG_VERSION}" \
      org.opencontainers.image.description="EPISeg spinal-cord segmentation of EPI-BOLD fMRI as a BIDS App" \
      org.opencontainers.image.licenses="MIT"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EPISEG_HOME=/opt/episeg \
    EPISEG_MODEL_DIR=/opt/episeg/models/episeg-v0.2 \
    EPISEG_CONTAINER_TYPE=docker \
    EPISEG_CONTAINER_TAG="episeg-bids:${EPISEG_VERSION}"

WORKDIR /opt/episeg-bids/src
COPY pyproject.toml constraints.txt README.md run.py ./
COPY episeg_bids ./episeg_bids

# The same install command as CI (Makefile 'setup'): the package with the pinned versions.
RUN pip install -c constraints.txt . \
 && episeg-bids install-model --url "${EPISEG_MODEL_URL}" ${EPISEG_MODEL_SHA256:+--sha256 "${EPISEG_MODEL_SHA256}"} \
 && chmod -R a+rX /opt/episeg \
 && useradd --create-home --uid 1000 episeg

# Runs as a non-root user with a read-only root filesystem and an unwritable $HOME: every
# cache and the pybids database live in the work directory (-w, default next to the output).
USER episeg
ENV HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/.cache

ENTRYPOINT ["episeg-bids"]
CMD ["--help"]
