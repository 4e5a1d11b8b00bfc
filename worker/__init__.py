"""Celery workers that own the GPU and run generation jobs (text-to-image and multi-reference). Fine-tuning and
benchmark jobs are planned: today a worker fails them as ``not_supported``."""
