"""Celery workers that own the GPU and run generation, fine-tuning and benchmark jobs."""
