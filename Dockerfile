# syntax=docker/dockerfile:1
#
# The fedpriv image: fedpriv and Flower 1.42 (flower-superlink, flower-supernode, flwr,
# flower-superexec) installed from uv.lock, run as a non-root user. The entrypoint is `fedpriv`,
# so a container's command is a fedpriv subcommand:
#
#   docker build -t fedpriv .
#   docker run --rm fedpriv presets
#
# docker-compose.yml runs a SuperLink, three SuperNodes and a run submission from this image;
# see docs/deployment.md.
#
# Build arguments
#   PYTHON_IMAGE  the base image (default python:3.11-slim; fedpriv needs exactly Python 3.11;
#                 docker-compose.yml passes $FEDPRIV_PYTHON_IMAGE)
#   UV_VERSION    the uv release installed from PyPI (the one the Makefile uses)
#   FEDPRIV_UID / FEDPRIV_GID
#                 uid and gid of the `fedpriv` user (default 1000). Compose mounts the key
#                 files and data files from the host unchanged (mode 0600, owned by whoever ran
#                 `fedpriv keys`), so build with your own: FEDPRIV_UID=$(id -u) FEDPRIV_GID=$(id -g)
#   GPU           0 (default): CPU image. 1: also install `tensorflow[and-cuda]` at the locked
#                 TensorFlow version (see "GPU variant" below)
#
# GPU variant (documented; not built or run on the machine this file was written on)
#   TensorFlow's Linux wheels load CUDA and cuDNN from the `nvidia-*-cu12` pip packages that its
#   `and-cuda` extra brings, so the GPU image keeps the same python:3.11-slim base; an
#   nvidia/cuda:*-cudnn-runtime base is not needed (and ships no Python 3.11). The host needs the
#   NVIDIA driver and the NVIDIA Container Toolkit, and each GPU container a device reservation
#   (commented in docker-compose.yml). uv.lock does not contain the nvidia-* packages (the extra
#   is not part of the project's dependencies), so with GPU=1 they are resolved at build time,
#   outside the lock, with TensorFlow itself pinned to the locked version:
#
#   docker build --build-arg GPU=1 -t fedpriv:gpu .
#   docker run --rm --gpus all fedpriv:gpu node join ...

ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG UV_VERSION=0.13.9
ARG FEDPRIV_UID=1000
ARG FEDPRIV_GID=1000
ARG GPU=0

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    FLWR_TELEMETRY_ENABLED=0 \
    TF_CPP_MIN_LOG_LEVEL=2

RUN pip install "uv==${UV_VERSION}"

WORKDIR /app

# Dependencies first, from the lock alone, so that editing the source does not reinstall them.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project

# Then the project itself (an editable install: fedpriv's Flower app is this directory, with
# pyproject.toml, and `fedpriv server run` submits it from here).
COPY . .
RUN uv sync --frozen --no-dev

RUN if [ "$GPU" = "1" ]; then \
        TF_VERSION="$(/app/.venv/bin/python -c 'import importlib.metadata as m; print(m.version("tensorflow"))')" \
        && uv pip install --python /app/.venv/bin/python "tensorflow[and-cuda]==${TF_VERSION}"; \
    fi

ENV PATH=/app/.venv/bin:$PATH

# A non-root user; /state is where the SuperLink and each SuperNode keep their state (a named
# volume in docker-compose.yml, which starts with this directory's owner and mode). Building as
# root: FEDPRIV_UID=0 would run fedpriv as root, so it is refused; give a non-root uid and hand the
# key and data files to it (docs/deployment.md, "Building as root").
RUN if [ "${FEDPRIV_UID}" = "0" ] || [ "${FEDPRIV_GID}" = "0" ]; then \
        echo "error: FEDPRIV_UID/FEDPRIV_GID 0 would run fedpriv as root; build with a non-root uid (e.g. 1000)" \
             "and chown the deployment's keys and data to it (docs/deployment.md, Building as root)" >&2; \
        exit 1; \
    fi
RUN (getent group "${FEDPRIV_GID}" >/dev/null || groupadd --gid "${FEDPRIV_GID}" fedpriv) \
    && useradd --uid "${FEDPRIV_UID}" --gid "${FEDPRIV_GID}" --create-home --shell /usr/sbin/nologin fedpriv \
    && mkdir -p /state \
    && chown "${FEDPRIV_UID}:${FEDPRIV_GID}" /state \
    && chmod 0700 /state \
    && fedpriv --help >/dev/null

USER fedpriv
ENV FEDPRIV_HOME=/home/fedpriv/.fedpriv

# 9092: the SuperLink's TLS port (fedpriv server start --port)
EXPOSE 9092

ENTRYPOINT ["fedpriv"]
CMD ["--help"]
