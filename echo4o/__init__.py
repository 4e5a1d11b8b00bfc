"""Core of the Echo-4o server: settings, CLI, logging and the torch-free job contract.

Everything in this package is importable without torch, FastAPI or Celery so that the gateway,
the workers and the CLI can all share it.
"""

__version__ = "0.1.0"
