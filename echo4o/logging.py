"""Structured logging: one line per event, JSON or key=value text, chosen by ECHO4O_LOG_FORMAT."""

from __future__ import annotations

import json
import logging
import sys
import time

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.kind = fmt

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in record.__dict__.items() if k not in _RESERVED}
        base = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if self.kind == "json":
            return json.dumps({**base, **fields}, default=str)
        extra = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        return f"{base['ts']} {base['level']:<7} {base['logger']}: {base['event']}" + (f" {extra}" if extra else "")


def _text(v: object) -> str:
    s = str(v)
    return json.dumps(s) if (" " in s or not s) else s


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once per process (idempotent)."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt))
    root.handlers[:] = [handler]
    root.setLevel(level)


def get_logger(name: str) -> logging.Logger:
    """Loggers take structured fields through ``extra``: ``log.info("job done", extra={"job_id": id})``."""
    return logging.getLogger(name)


#: Logger name and message fragment of library warnings that tell the user nothing they can act on.
_XFORMERS_NO_EXTENSIONS = ("xformers", "can't load C++/CUDA extensions")
#: bitsandbytes (0.50) on a CPU with AVX512-BF16 tries, at import, to fetch an optional CPU 4-bit kernel from the
#: Hugging Face Hub through the `kernels` package, and warns "Failed to load" when it cannot: its own CPU kernel
#: runs instead, and the 4-bit modes are meant for GPUs anyway.
_BNB_CPU_KERNEL = ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward")


class _Drop(logging.Filter):
    """Drops a record containing ``fragment``."""

    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


class _DropWithoutCuda(_Drop):
    """Drops a record containing ``fragment`` when this process has no CUDA device: xformers' kernels need
    CUDA, so on a CPU machine its "can't load C++/CUDA extensions" warning describes nothing the user could use
    (the engine runs sdpa there). With CUDA present the warning is kept: it explains why ``auto`` attention
    does not pick xformers."""

    def filter(self, record: logging.LogRecord) -> bool:
        if super().filter(record):
            return True
        torch = sys.modules.get("torch")  # xformers imports torch before it warns
        return bool(torch is not None and torch.cuda.is_available())


def quiet_library_noise() -> None:
    """Install the filters for library warnings that mean nothing to the user; call it before the library is
    imported (the ``echo4o`` command does, first thing). Idempotent; other messages of those loggers pass."""
    for (name, fragment), kind in ((_XFORMERS_NO_EXTENSIONS, _DropWithoutCuda), (_BNB_CPU_KERNEL, _Drop)):
        logger = logging.getLogger(name)
        if not any(type(f) is kind for f in logger.filters):
            logger.addFilter(kind(fragment))
