"""FastAPI gateway: HTTP API over the job queue. Never imports torch or the engine."""
