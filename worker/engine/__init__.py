"""Echo-4o / BAGEL inference engine: a library (no Celery, no FastAPI)."""
