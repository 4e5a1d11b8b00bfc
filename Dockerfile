# One image for gateway, worker and UI; the command picks the role.
FROM python:3.11-slim

# CUDA build of the pinned torch release for the GPU worker; set to "cpu" for a CPU-only image.
ARG TORCH_VARIANT=cu128
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1

WORKDIR /app
RUN pip install "torch==2.13.0" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"
COPY pyproject.toml README.md ./
COPY echo4o ./echo4o
COPY backend ./backend
COPY worker ./worker
COPY frontend_gradio ./frontend_gradio
RUN pip install -e . && if [ "$TORCH_VARIANT" != "cpu" ]; then pip install -e '.[gpu]'; fi

ENV ECHO4O_DATA_DIR=/data ECHO4O_WEIGHTS_DIR=/weights HF_HOME=/weights/hf-cache
VOLUME ["/data", "/weights"]
CMD ["echo4o", "--help"]
