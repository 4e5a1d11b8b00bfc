"""Several training processes: the torchrun entry point.

``torchrun --nproc_per_node=N -m worker.training.distributed CONFIG.json`` (or ``accelerate launch -m ...``)
starts N processes; each reads the same :class:`~worker.training.trainer.TrainConfig` JSON, joins the process
group (``nccl`` on CUDA, ``gloo`` on the CPU) and runs :class:`~worker.training.trainer.Trainer` with its rank:
every step each process computes its share of the global batch and the gradients are averaged over processes
(as DDP does), so the update equals the one process computes on the whole batch. Rank 0 writes checkpoints,
TensorBoard events and the manifest. Multi-host: the same command on every host with ``--nnodes``,
``--node_rank`` and ``--rdzv_endpoint`` (see ``docs/training.md``).

With ``sharding="fsdp"`` in the config (full mode) the model is sharded with PyTorch FSDP2 (``fully_shard`` per
decoder layer, then the root; bf16 mixed precision on CUDA): parameters, gradients, AdamW moments and EMA are
split over the processes, so full mode of the 7B MoT fits 80 GB cards from 4 processes on (``memory_estimate``
with ``shards``); checkpoints are gathered to whole tensors and written by rank 0 in the released layout. It
runs on the CPU with gloo too (tested with two processes). ``sharding="ddp"`` (the default) keeps the whole
model in every process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from worker.training.trainer import TrainConfig, Trainer, World


def init_world() -> World:
    """Join the process group torchrun describes in the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_*``);
    a lone process without those variables is rank 0 of 1."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return World(rank=dist.get_rank(), size=dist.get_world_size())


#: Prefix of the progress lines rank 0 prints with ``--progress`` (one JSON object after it per line).
PROGRESS_PREFIX = "ECHO4O_PROGRESS "


def _emit(event: dict) -> None:
    print(PROGRESS_PREFIX + json.dumps(event), flush=True)


def run(config: TrainConfig, *, progress: bool = False) -> dict:
    """Train with this process's place in the world; returns the manifest (rank 0 writes it). ``progress``:
    rank 0 prints a ``setup`` line (the loss history of a resumed run) and a ``step`` line after every step,
    which the finetune job handler reads (:mod:`worker.training.job`)."""
    world = init_world()
    try:
        trainer = Trainer(config, world=world)
        trainer.setup()
        if progress and world.rank == 0:
            _emit({"event": "setup", "step": trainer.step, "history": trainer.history})
            trainer.callback = lambda p: _emit({
                "event": "step", "step": p.step, "total_steps": p.total_steps, "loss": p.loss, "lr": p.lr,
                "samples_per_s": p.samples_per_s, "eta_s": p.eta_s, "skipped_rows": trainer.data.counts.skipped})
        return trainer.train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    progress = "--progress" in argv
    argv = [a for a in argv if a != "--progress"]
    if len(argv) != 1:
        print("usage: torchrun --nproc_per_node=N -m worker.training.distributed [--progress] CONFIG.json",
              file=sys.stderr)
        return 2
    config = TrainConfig.model_validate(json.loads(Path(argv[0]).read_text(encoding="utf-8")))
    try:
        manifest = run(config, progress=progress)
    except Exception as exc:
        if progress:  # the job handler puts each rank's error first in the job's message
            _emit({"event": "error", "rank": int(os.environ.get("RANK", "0")), "error": f"{type(exc).__name__}: {exc}"})
        raise
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"steps": manifest["steps"], "final_loss": manifest["final_loss"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
