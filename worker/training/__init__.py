"""Fine-tuning of BAGEL / Echo-4o: data readers, token-budget packing, the flow-matching objective, the trainer.

A library driven top to bottom by :class:`worker.training.trainer.Trainer` (no Celery, no FastAPI): read
samples (:mod:`~worker.training.data`), pack them by token budget (:mod:`~worker.training.packing`), compute the
loss of a pack (:mod:`~worker.training.objective`), step the optimizer, checkpoint in the released layout
(:mod:`~worker.training.trainer`); several processes via torchrun (:mod:`~worker.training.distributed`).
"""
