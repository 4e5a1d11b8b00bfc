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


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes, not the stream it was when logging was set up
    (a command run in-process by a test, whose captured stderr is closed afterwards, left handlers writing to a
    closed file: "--- Logging error --- I/O operation on closed file")."""

    @property
    def stream(self):  # noqa: ANN201 - a text stream
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001 - StreamHandler.__init__ assigns it
        pass


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once per process (idempotent)."""
    root = logging.getLogger()
    handler = _Stderr()
    handler.setFormatter(_Formatter(fmt))
    root.handlers[:] = [handler]
    root.setLevel(level)


def get_logger(name: str) -> logging.Logger:
    """Loggers take structured fields through ``extra``: ``log.info("job done", extra={"job_id": id})``."""
    return logging.getLogger(name)


#: Logger name and message fragment of library warnings that tell the user nothing they can act on.
#: xformers (0.0.35) warns at import, beside a torch its compiled library was not built for, that memory-efficient
#: attention "won't be available": its attention does not use that library (worker/engine/attention.py, the note
#: above XFORMERS_PAIRING), and the engine logs what is true instead.
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


def quiet_library_noise() -> None:
    """Install the filters for library warnings that mean nothing to the user; call it before the library is
    imported (the ``echo4o`` command does, first thing, and so does importing ``worker.engine``). Idempotent;
    other messages of those loggers pass."""
    for name, fragment in (_XFORMERS_NO_EXTENSIONS, _BNB_CPU_KERNEL):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(_Drop(fragment))
