# syntax=docker/dockerfile:1
# Two images from one file; the command picks the role (docker-compose.yml):
#   cpu  gateway and demo UI: the CPU build of torch (the gateway never imports it; it is a package dependency)
#   gpu  workers (queues gpu and train): the CUDA build of torch and xformers (the `gpu` extra). The CUDA runtime
#        comes with the torch wheels; the host needs only the NVIDIA driver and the NVIDIA container toolkit.
#   docker build --target cpu -t echo4o-server:cpu .
#   docker build --target gpu -t echo4o-server:gpu --build-arg TORCH_CUDA=cu128 .
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    ECHO4O_DATA_DIR=/data ECHO4O_WEIGHTS_DIR=/weights HF_HOME=/hf-cache
WORKDIR /app
RUN mkdir -p /data /weights /hf-cache

FROM base AS cpu
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY echo4o ./echo4o
COPY backend ./backend
COPY worker ./worker
COPY frontend_gradio ./frontend_gradio
RUN pip install .
VOLUME ["/data"]
EXPOSE 8000 7860
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["echo4o", "healthcheck", "url", "http://127.0.0.1:8000/healthz"]
CMD ["echo4o", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS gpu
# CUDA wheel index of the pinned torch release: cu128 (CUDA 12.8, driver >= 570). xformers 0.0.35 (gpu extra)
# attends with torch's own CUDA kernels; its compiled library (2:4 sparsity; not used by the engine) is built
# for CUDA 12.8 and loads beside torch 2.13.0+cu128 too. The worker probes the attention on the card at start.
# The gpu extra also brings bitsandbytes (ECHO4O_MEMORY_MODE int8 / nf4).
ARG TORCH_CUDA=cu128
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"
COPY pyproject.toml README.md ./
COPY echo4o ./echo4o
COPY backend ./backend
COPY worker ./worker
COPY frontend_gradio ./frontend_gradio
RUN pip install ".[gpu]"
VOLUME ["/data", "/weights", "/hf-cache"]
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["echo4o", "healthcheck", "worker"]
CMD ["echo4o", "worker", "--queues", "gpu"]
