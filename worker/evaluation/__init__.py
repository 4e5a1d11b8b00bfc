"""Benchmark runs over the engine: suites (prompt files), judge protocols, an OpenAI-compatible judge client,
scoring, a resumable runner and reports. Torch-free: the runner is handed a generate function (the CLI or the
worker builds it from a loaded pipeline), so this package imports neither torch, Celery nor FastAPI."""
