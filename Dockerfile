# syntax=docker/dockerfile:1
# Prediction service image: serves the model exported to build/model on port 8000.
#
#   facemask export models:/facemask-classifier@champion --out build/model
#   docker build -t facemask-serve .
#
# The face detector's model file must be in the build context at
# facemask/faces/models/face_detection_short_range.tflite (`make setup` or
# `facemask fetch-face-model` installs it there); the build fails without it.
#
# With `--format onnx` added to the export, the service runs the model with ONNX Runtime and
# does not import torch: under 0.5 GiB of memory instead of 1.1 GiB, and about 2 s to start
# instead of 7 s on 2 CPU cores (docs/benchmarks.md).
#   docker run --rm -p 127.0.0.1:8000:8000 facemask-serve
#
# Build arguments:
#   BASE_IMAGE         any Debian-based image with python3 (3.11) and the venv module.
#   TORCH_REQUIREMENT  the torch to install, for example torch==2.14.1+cpu together with
#                      --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for a
#                      CPU-only build, or a version whose wheel lies in wheels/.
#   TORCH_INDEX_URL    an extra index for torch; empty uses the default index only.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
ARG TORCH_REQUIREMENT=torch==2.14.1
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# `python3 -m venv` works on the official image (python in /usr/local/bin) and on Debian's
# python3 (/usr/bin); later steps call the venv's python only.
RUN python3 -m venv /opt/venv
COPY wheels/ /tmp/wheels/
# Behind a TLS-intercepting proxy, pass its CA bundle as a build secret:
#   --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt
# torch goes first and alone, so a CPU-only or local wheel satisfies it before the rest resolve.
RUN --mount=type=secret,id=pip_ca \
    if [ -f /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && /opt/venv/bin/python -m pip install --find-links /tmp/wheels \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "$TORCH_REQUIREMENT"
COPY requirements-serve.txt requirements-nodeps.in /tmp/
COPY scripts/pip_check.py /tmp/pip_check.py
# mediapipe goes without its dependencies: it declares opencv-contrib-python, whose cv2 would
# replace opencv-python-headless's (requirements-nodeps.in). pip_check.py accepts that one gap.
RUN --mount=type=secret,id=pip_ca \
    if [ -f /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && /opt/venv/bin/python -m pip install -r /tmp/requirements-serve.txt \
    && /opt/venv/bin/python -m pip install --no-deps -r /tmp/requirements-nodeps.in \
    && /opt/venv/bin/python /tmp/pip_check.py \
    && /opt/venv/bin/python -m pip uninstall -y pip setuptools \
    && find /opt/venv -name __pycache__ -type d -prune -exec rm -rf {} +

FROM ${BASE_IMAGE} AS runtime
# A fixed numeric user, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin facemask
# mediapipe's libmediapipe.so (1.2.3) links libEGL.so.1 and libGLESv2.so.2, so the face detector
# does not load without them, although it runs on the CPU. Versions come from the base image's
# Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libegl1 libgles2 \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY serve.py ./
COPY conf/ conf/
COPY facemask/ facemask/
# Checks the face detector's model file, then loads the detector once, so a missing or wrong
# file, package or system library fails the build instead of the service's start. matplotlib's
# font cache goes to a folder removed after (mediapipe's vision module imports matplotlib.pyplot).
RUN if ! PYTHONDONTWRITEBYTECODE=1 /opt/venv/bin/python -c \
        "from facemask.faces.detector import blazeface_model_path; blazeface_model_path()"; then \
        echo "The build context needs facemask/faces/models/face_detection_short_range.tflite" \
            "with the right SHA-256: run 'make setup' or 'facemask fetch-face-model' first." >&2; \
        exit 1; \
    fi \
    && MPLCONFIGDIR=/tmp/matplotlib PYTHONDONTWRITEBYTECODE=1 /opt/venv/bin/python -c \
        "from facemask.faces.detector import BlazeFaceDetector; BlazeFaceDetector()" \
    && rm -rf /tmp/matplotlib
COPY build/model/ model/
# The prediction log lives in /app/logs; Kubernetes mounts a writable volume there.
RUN mkdir -p /app/logs && chown facemask:facemask /app/logs
ENV PATH=/opt/venv/bin:$PATH \
    FACEMASK_ROOT=/app \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    NO_ALBUMENTATIONS_UPDATE=1
USER 10001:10001
EXPOSE 8000
# NOTE: the check assumes the default port 8000; change it too when overriding port=.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# serve.py shuts uvicorn down gracefully on SIGTERM and exits with status 143.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "serve.py", "host=0.0.0.0", "port=8000"]
# Arguments replace this default: for example model.uri=models:/facemask-classifier@champion
# with -e MLFLOW_TRACKING_URI=http://mlflow:5000 to load from a tracking server instead.
CMD ["model.uri=/app/model"]
