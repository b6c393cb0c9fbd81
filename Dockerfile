# The VAE service on an NVIDIA GPU (falls back to CPU when none is visible).
#   docker compose up --build        (see docker-compose.yml: GPU reservation, ./models read-only)
# The CUDA/cuDNN runtime matches onnxruntime-gpu's requirements (CUDA 13, cuDNN 9); override
# CUDA_IMAGE for other drivers. Models are not baked in: mount them at /models.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# Dependencies first (cached until pyproject.toml changes), then the service code only:
# the serving image never contains the training package.
COPY pyproject.toml README.md ./
RUN mkdir service && touch service/__init__.py && pip install . && pip uninstall -y vae-serve
COPY service ./service
RUN pip install --no-deps . && rm -rf /app/service

# An unprivileged user with no home and no shell; the container runs read-only (compose).
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin vae
USER vae

ENV VAE_MODELS_DIR=/models \
    VAE_HOST=0.0.0.0 \
    VAE_PORT=8000 \
    VAE_JSON_LOGS=true
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
CMD ["vae-serve"]
