"""Celery workers that own the GPU and run every kind of job: generation (text-to-image and multi-reference),
fine-tuning (``worker/training/``) and benchmark runs (``worker/evaluation/``); the handler of each kind is in
:data:`worker.tasks.JOB_HANDLERS`."""
