"""The fine-tuning driver: :class:`TrainConfig` (every knob, bounded) and :class:`Trainer` (setup, train, save).

One optimizer step, top to bottom: take the next pack (the global batch), keep this process's share
(``samples[rank::world]``), build the packed sequence (:mod:`~worker.training.objective`) with one generator per
sample seeded by ``(seed, step, sample index)``, run the forward, divide the summed MSE / CE by the token
counts of the whole global batch (all-reduced), backward, average the gradients over processes, clip, AdamW,
warm-up schedule, EMA, report progress. So N processes compute the same update as one process on the same
data, up to float summation order.

Modes: ``lora`` (peft on the generation expert, :mod:`~worker.training.lora`) and ``full`` (everything but the
frozen VAE; the fixed position tables stay frozen). Checkpoints are written in the released layout (configs,
``ema.safetensors`` with the EMA weights, LoRA merged, ``ae.safetensors`` and tokenizer files of the base),
so :meth:`~worker.engine.pipeline.Echo4oPipeline.from_pretrained` loads each of them, plus ``trainer_state.pt``
(parameters, optimizer, schedule, EMA, step) for resuming. The finished run is the output folder itself, with
``manifest.json``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import save_file

from echo4o.logging import get_logger
from worker.engine.config import AE_CONFIG, AE_WEIGHTS, EMA_WEIGHTS, LLM_CONFIG, VIT_CONFIG, BagelConfig
from worker.engine.loading import TOKENIZER_FILES
from worker.training import lora as lora_lib
from worker.training.data import Sample, TrainingData
from worker.training.objective import DropoutConfig, PackLoss, Preprocessor, forward_loss
from worker.training.packing import ImageRules, PackingConfig, TokenCounter, pack

log = get_logger(__name__)

MANIFEST = "manifest.json"
STATE = "trainer_state.pt"
CHECKPOINTS = "checkpoints"
GIB = 1024**3


class TrainingError(RuntimeError):
    """The run cannot start or go on; the message says why and what to change."""


class TrainConfig(BaseModel):
    """Every setting of a fine-tuning run. Defaults are Echo-4o's fine-tuning recipe where it has one."""

    model_config = ConfigDict(extra="forbid")

    base_model: str
    """Checkpoint to start from: a folder in the released layout or a Hub id."""
    data: str
    """Training data: a folder / file of parquet files or Echo-4o-Image shards, or a Hub dataset id."""
    output_dir: str
    """Where checkpoints, TensorBoard events and the finished version (released layout + manifest) go."""
    mode: Literal["lora", "full"] = "lora"
    """``lora``: adapters on the generation expert; ``full``: everything but the VAE."""
    lora_rank: int = Field(16, ge=1, le=1024)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_export: Literal["merged", "adapter"] = "merged"
    """``merged``: the version's weights include the adapter; ``adapter``: the base weights plus ``adapter/``."""
    total_steps: int = Field(1000, ge=1, le=10_000_000)
    lr: float = Field(2e-5, gt=0, le=1)
    warmup_steps: int = Field(100, ge=0)
    """Linear warm-up from 0 to ``lr``, then constant (the reference's constant schedule)."""
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    adam_eps: float = Field(1e-15, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    """EMA of the trained weights (0: no EMA, the raw weights are exported)."""
    max_grad_norm: float = Field(1.0, gt=0)
    timestep_shift: float = Field(1.0, gt=0)
    mse_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(1.0, ge=0)
    text_loss: bool = False
    """Cross-entropy on captions / instructions too (the reference marks them condition only)."""
    text_dropout: float = Field(0.1, ge=0, le=1)
    vit_dropout: float = Field(0.3, ge=0, le=1)
    vae_dropout: float = Field(0.3, ge=0, le=1)
    expected_tokens: int = Field(10240, ge=1)
    max_tokens: int = Field(11520, ge=1)
    max_tokens_per_sample: int = Field(10240, ge=1)
    vae_max_size: int = Field(1024, ge=16)
    vae_min_size: int = Field(512, ge=16)
    vit_max_size: int = Field(980, ge=14)
    vit_min_size: int = Field(224, ge=14)
    gradient_checkpointing: bool = True
    autocast_dtype: Literal["bfloat16", "float16", "none"] = "bfloat16"
    """Autocast dtype on CUDA (master weights stay float32); the CPU always runs float32."""
    device: str = "auto"
    save_every: int = Field(500, ge=1)
    seed: int = Field(0, ge=0)
    resample_noise: bool = True
    """False: every step draws the same timesteps, noise and dropout for the same sample (an overfit check)."""
    tensorboard: bool = True
    sharding: Literal["ddp", "fsdp"] = "ddp"
    """With several processes: ``ddp`` (every process holds the whole model, gradients averaged) or ``fsdp``
    (full mode only: PyTorch FSDP2 ``fully_shard`` per decoder layer then the root, so parameters, gradients,
    AdamW moments and EMA are split over the processes; bf16 mixed precision on CUDA). One process: ignored."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        PackingConfig(self.expected_tokens, self.max_tokens, self.max_tokens_per_sample)
        if self.sharding == "fsdp" and self.mode != "full":
            raise ValueError("sharding=fsdp is for mode=full (LoRA fits one GPU: use sharding=ddp)")
        if self.vae_min_size > self.vae_max_size or self.vit_min_size > self.vit_max_size:
            raise ValueError("image min sizes must not exceed the max sizes")
        return self

    @property
    def packing(self) -> PackingConfig:
        return PackingConfig(self.expected_tokens, self.max_tokens, self.max_tokens_per_sample,
                             prefer_buffer_before=self.expected_tokens // 2)

    @property
    def rules(self) -> ImageRules:
        return ImageRules(self.vae_max_size, self.vae_min_size, self.vit_max_size, self.vit_min_size)


@dataclass
class Progress:
    """What the callback gets after every optimizer step."""

    step: int
    total_steps: int
    loss: float
    mse: float
    ce: float
    lr: float
    grad_norm: float
    samples_per_s: float
    eta_s: float


@dataclass
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1


# ---------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Bytes one GPU needs for a mode, with the arithmetic (see ``docs/training.md``)."""

    mode: str
    params: int
    trainable: int
    vae_params: int
    shards: int
    weights_bytes: int
    training_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.training_bytes + self.activation_bytes

    def describe(self) -> str:
        return (f"{self.mode}: {self.params / 1e9:.2f}B parameters ({self.trainable / 1e9:.3f}B trained), "
                f"weights {self.weights_bytes / GIB:.1f} GiB + gradients/AdamW/EMA "
                f"({self.trainable / 1e9:.3f}e9 x 20 B{f' / {self.shards} shards' if self.shards > 1 else ''}) "
                f"{self.training_bytes / GIB:.1f} "
                f"GiB + activations ~{self.activation_bytes / GIB:.1f} GiB = {self.total_bytes / GIB:.1f} GiB per "
                f"GPU over {self.shards} shard(s)")

    def check(self, gpu_bytes: int) -> None:
        """Raise :class:`TrainingError` with the numbers when one GPU of ``gpu_bytes`` cannot hold the run."""
        if self.total_bytes > gpu_bytes:
            hint = "use mode=lora"
            if self.mode == "full":
                need = math.ceil(self.training_bytes * self.shards
                                 / max(gpu_bytes - self.activation_bytes - self.weights_bytes, 1))
                hint = f"use mode=lora, or shard full mode over at least {need} GPUs with FSDP (torchrun)"
            raise TrainingError(f"this run does not fit a {gpu_bytes / GIB:.0f} GiB GPU: {self.describe()}; {hint}")


def memory_estimate(config: BagelConfig, mode: str, *, shards: int = 1, lora_rank: int = 16,
                    max_tokens: int = 11520, checkpointing: bool = True) -> MemoryEstimate:
    """Per-GPU memory of training ``config`` in ``mode``, counting parameters on the meta device.

    Full mode: every parameter but the VAE trained, 4 (float32 weight) + 4 (gradient) + 8 (AdamW moments) +
    4 (EMA) = 20 bytes each, divided over ``shards`` (FSDP). LoRA: the frozen model in bfloat16 (2 bytes each,
    on every GPU) plus 20 bytes per adapter parameter. Activations with checkpointing: each layer's input kept
    (``max_tokens * hidden * 2`` bytes per layer) plus one layer's working set recomputed (about
    ``max_tokens * (12 * hidden + 3 * intermediate) * 2`` bytes); without checkpointing the working set of
    every layer.
    """
    from worker.engine.models.bagel import Bagel
    from worker.engine.models.vae import FluxVAE

    with torch.device("meta"):
        model = Bagel(config)
        vae = FluxVAE(config.vae)
    params = sum(p.numel() for p in model.parameters())
    vae_params = sum(p.numel() for p in vae.parameters())
    llm = config.llm
    if mode == "full":
        trainable = params
        weights = 0
        training = 20 * trainable // shards
    elif mode == "lora":
        head_dim = llm.hidden_size // llm.num_attention_heads
        q, kv = llm.num_attention_heads * head_dim, llm.num_key_value_heads * head_dim
        per_layer = lora_rank * ((llm.hidden_size + q) * 2 + (llm.hidden_size + kv) * 2
                                 + 3 * (llm.hidden_size + llm.intermediate_size))
        trainable = per_layer * llm.num_hidden_layers
        weights = 2 * (params + vae_params)
        training = 20 * trainable
    else:
        raise ValueError(f"mode must be 'lora' or 'full'; got {mode!r}")
    if mode == "full":
        weights = 2 * vae_params
    working = max_tokens * (12 * llm.hidden_size + 3 * llm.intermediate_size) * 2
    kept = max_tokens * llm.hidden_size * 2 * llm.num_hidden_layers
    activations = kept + working if checkpointing else working * llm.num_hidden_layers
    return MemoryEstimate(mode=mode, params=params, trainable=trainable, vae_params=vae_params, shards=shards,
                          weights_bytes=weights, training_bytes=training, activation_bytes=activations)


def released_7b_config() -> BagelConfig:
    """The configuration of the released BAGEL-7B-MoT / Echo-4o (for estimates without the files)."""
    from worker.engine.config import llm_config_from_dict, vit_config_from_dict

    llm = llm_config_from_dict({"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                                "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                                "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768})
    vit = vit_config_from_dict({"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                                "num_attention_heads": 16, "patch_size": 14, "image_size": 980, "num_channels": 3})
    return BagelConfig(llm=llm, vit=vit)


# ---------------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------------


def sample_generator(seed: int, step: int, index: int, resample: bool = True) -> torch.Generator:
    """The CPU generator of global sample ``index`` of optimizer step ``step`` (``step`` ignored when not
    ``resample``): the same draws whichever process computes the sample."""
    key = (seed * 1_000_003 + (step if resample else 0)) * 1_000_003 + index
    return torch.Generator().manual_seed(key % (2**63 - 1))


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Learning-rate factor before optimizer step ``step`` (0-based): ``(step + 1) / warmup`` during warm-up,
    then 1."""
    return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)


class EMA:
    """Float32 exponential moving average of the trained parameters: ``e <- d e + (1 - d) p`` after each step."""

    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.params = named_params
        self.shadow = {n: p.detach().float().clone() for n, p in named_params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.shadow[name].mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live parameters and the averages (call twice to restore)."""
        for name, p in self.params.items():
            live = p.detach().float().clone()
            p.copy_(self.shadow[name].to(p.dtype))
            self.shadow[name] = live


Callback = Callable[[Progress], object]


class Trainer:
    """A fine-tuning run: ``Trainer(config).train()`` returns the manifest of the finished version.

    ``callback(progress)`` runs after every step (on rank 0); an exception from it stops the run (the last
    checkpoint stays, ``resume`` continues from it). ``resume``: continue from the newest checkpoint under
    ``output_dir`` when there is one.
    """

    def __init__(self, config: TrainConfig, *, callback: Callback | None = None, resume: bool = True,
                 world: World | None = None):
        self.config = config
        self.callback = callback
        self.resume = resume
        self.world = world or World()
        self.out = Path(config.output_dir)
        self.step = 0
        self.history: list[float] = []
        self.elapsed = 0.0

    # -------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from worker.engine.pipeline import Echo4oPipeline, resolve_device

        cfg = self.config
        device = resolve_device(cfg.device)
        if self.world.distributed and device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        self.device = device
        pipe = Echo4oPipeline.from_pretrained(cfg.base_model, device=device, dtype="float32", device_map=None)
        self.pipe, self.model, self.vae = pipe, pipe.model, pipe.vae
        self.base_path = Path(_resolved_path(cfg.base_model))
        if device.type == "cuda":
            est = memory_estimate(self.model.config, cfg.mode, shards=self.world.size if self.sharded else 1,
                                  lora_rank=cfg.lora_rank, max_tokens=cfg.max_tokens,
                                  checkpointing=cfg.gradient_checkpointing)
            est.check(torch.cuda.get_device_properties(device).total_memory)
        self.model.train()
        if cfg.mode == "lora":
            self.lora = lora_lib.lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
            with torch.random.fork_rng(devices=[]):  # the adapter's initial values follow the seed
                torch.manual_seed(cfg.seed)
                lora_lib.add_lora(self.model, self.lora)
        else:
            self.lora = None
            for name, p in self.model.named_parameters():
                p.requires_grad_(not name.endswith("pos_embed"))
        self.runner: torch.nn.Module | None = None
        if self.sharded:
            self._shard()
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.trainable.values(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                           eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_factor(s, cfg.warmup_steps))
        self.ema = EMA(self.trainable, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.preprocessor = Preprocessor(
            self.model, self.vae, pipe.encode_prompt, pipe.special, cfg.rules,
            DropoutConfig(cfg.text_dropout, cfg.vit_dropout, cfg.vae_dropout), cfg.timestep_shift, cfg.text_loss)
        self.data = TrainingData(cfg.data, repeat=True, choice_seed=cfg.seed)
        counter = TokenCounter(self.model.config, cfg.rules, pipe.encode_prompt)
        self.packs: Iterator[list[Sample]] = pack(self.data, counter, cfg.packing, self.data.counts)
        if self.resume:
            self._load_latest()
        self.writer = self._tensorboard() if self.world.rank == 0 else None

    @property
    def sharded(self) -> bool:
        """FSDP: several processes and ``sharding=fsdp``."""
        return self.world.distributed and self.config.sharding == "fsdp"

    def _shard(self) -> None:
        """FSDP2: ``fully_shard`` each decoder layer, then the root (a module whose forward is the loss, so the
        root's hooks gather the embeddings, ViT, connector and projections that ``forward_loss`` calls directly).
        Unused parameters (a ViT dropped on one process) are reduce-scattered as zeros so every process joins
        the same collectives."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        cfg = self.config
        mp = MixedPrecisionPolicy()
        if self.device.type == "cuda" and cfg.autocast_dtype != "none":
            mp = MixedPrecisionPolicy(param_dtype=getattr(torch, cfg.autocast_dtype), reduce_dtype=torch.float32)
        runner = _LossRunner(self.model, cfg.gradient_checkpointing)
        for layer in self.model.llm.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(runner, mp_policy=mp)
        runner.set_reduce_scatter_unused_params(True)
        self.runner = runner

    def _full(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole CPU tensors of (possibly sharded) ``tensors``: a collective in sharded mode (every process
        calls it, tensor by tensor); only rank 0 keeps the result there."""
        if not self.sharded:
            return {k: v.detach().clone() for k, v in tensors.items()}
        from torch.distributed.tensor import DTensor

        out = {}
        for k, v in tensors.items():
            full = v.detach().full_tensor() if isinstance(v, DTensor) else v.detach()
            if self.world.rank == 0:
                out[k] = full.cpu().clone()
        return out

    def _tensorboard(self):
        if not self.config.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed: no event files are written (pip install tensorboard)")
            return None
        return SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step or None)

    # -------------------------------------------------------------------------------- training
    def train(self) -> dict:
        if not hasattr(self, "model"):
            self.setup()
        cfg = self.config
        started = time.time()
        t_run = time.perf_counter()
        samples_done = 0
        while self.step < cfg.total_steps:
            t0 = time.perf_counter()
            batch = next(self.packs)
            mse, ce, loss, norm = self.train_step(batch)
            samples_done += len(batch)
            self.step += 1
            self.history.append(loss)
            rate = samples_done / max(time.perf_counter() - t_run, 1e-9)
            step_s = time.perf_counter() - t0
            progress = Progress(step=self.step, total_steps=cfg.total_steps, loss=loss, mse=mse, ce=ce,
                                lr=self.optimizer.param_groups[0]["lr"], grad_norm=norm, samples_per_s=rate,
                                eta_s=step_s * (cfg.total_steps - self.step))
            if self.writer is not None:
                for key in ("loss", "mse", "ce", "lr", "grad_norm", "samples_per_s"):
                    self.writer.add_scalar(f"train/{key}", getattr(progress, key), self.step)
            if self.step % cfg.save_every == 0 or self.step == cfg.total_steps:
                self.save_checkpoint()
            if self.callback is not None and self.world.rank == 0:
                self.callback(progress)
        self.elapsed += time.time() - started
        manifest = self.finish(started)
        if self.writer is not None:
            self.writer.close()
        return manifest

    def train_step(self, samples: list[Sample]) -> tuple[float, float, float, float]:
        """One optimizer step on the global batch ``samples``; returns (mse, ce, loss, grad norm)."""
        cfg, world = self.config, self.world
        mine = list(range(world.rank, len(samples), world.size))
        dummy = self.sharded and not mine
        if dummy:  # FSDP: every process must run the forward and backward (its collectives); weight 0
            mine = [0]
        gens = [sample_generator(cfg.seed, self.step, i, cfg.resample_noise) for i in mine]
        self.optimizer.zero_grad(set_to_none=True)
        batch = self.preprocessor.build([samples[i] for i in mine], gens) if mine else None
        autocast = (self.device.type == "cuda" and cfg.autocast_dtype != "none")
        with torch.autocast(self.device.type, dtype=getattr(torch, cfg.autocast_dtype, torch.bfloat16),
                            enabled=autocast):
            if batch is not None and self.runner is not None:
                out = PackLoss(*self.runner(batch))
            elif batch is not None:
                out = forward_loss(self.model, batch, checkpointing=cfg.gradient_checkpointing)
            else:
                zero = torch.zeros((), device=self.device)
                out = PackLoss(zero, 0, zero, 0)
        if dummy:
            out = PackLoss(out.mse_sum * 0, 0, out.ce_sum * 0, 0)
        counts = torch.tensor([out.mse_tokens, out.ce_tokens], dtype=torch.float64, device=self.device)
        sums = torch.stack([out.mse_sum.detach().float(), out.ce_sum.detach().float()]).double()
        if world.distributed:
            import torch.distributed as dist

            dist.all_reduce(counts)
            dist.all_reduce(sums)
        mse_tokens, ce_tokens = counts.tolist()
        loss = out.mse_sum * 0
        if mse_tokens:
            loss = loss + cfg.mse_weight * out.mse_sum / mse_tokens
        if ce_tokens:
            loss = loss + cfg.ce_weight * out.ce_sum / ce_tokens
        if loss.requires_grad:
            (loss * world.size).backward()
        if world.distributed and not self.sharded:  # FSDP reduce-scatters (averages) them itself
            self._average_gradients()
        norm = torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        mse = sums[0].item() / mse_tokens if mse_tokens else 0.0
        ce = sums[1].item() / ce_tokens if ce_tokens else 0.0
        return mse, ce, cfg.mse_weight * mse + cfg.ce_weight * ce, float(norm)

    def _average_gradients(self) -> None:
        """All-reduce and average the gradients over processes, as DDP does (one flat buffer)."""
        import torch.distributed as dist

        params = list(self.trainable.values())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world.size
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    # -------------------------------------------------------------------------------- saving
    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights of the version under the released names: EMA weights if kept, LoRA merged."""
        if self.ema is not None:
            self.ema.swap()
        try:
            if self.lora is not None:
                state = lora_lib.merged_state_dict(self.model)
            else:
                state = self._full(self.model.state_dict())
        finally:
            if self.ema is not None:
                self.ema.swap()
        return {k: v.contiguous() for k, v in state.items()}

    def write_released(self, folder: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
        """The released layout in ``folder``: trained ``ema.safetensors`` (``weights`` when given, gathered
        beforehand in sharded mode), the base's configs, VAE, tokenizer."""
        folder.mkdir(parents=True, exist_ok=True)
        for name in (LLM_CONFIG, VIT_CONFIG, AE_CONFIG, AE_WEIGHTS, *TOKENIZER_FILES, "tokenizer.json",
                     "special_tokens_map.json", "added_tokens.json", "generation_config.json"):
            src = self.base_path / name
            if src.is_file():
                _link_or_copy(src, folder / name)
        if self.lora is not None and self.config.lora_export == "adapter":
            _link_or_copy(self.base_path / EMA_WEIGHTS, folder / EMA_WEIGHTS)
            if self.ema is not None:
                self.ema.swap()
            try:
                lora_lib.save_adapter(self.model, self.lora, folder / "adapter")
            finally:
                if self.ema is not None:
                    self.ema.swap()
        else:
            weights = self.export_state_dict() if weights is None else weights
            save_file(weights, str(folder / EMA_WEIGHTS), metadata={"format": "pt"})

    def save_checkpoint(self) -> Path:
        """``checkpoints/step-NNNNNNNN``: the released layout plus ``trainer_state.pt``, written to a temporary
        folder then renamed, so a checkpoint folder is complete or absent."""
        final = self.out / CHECKPOINTS / f"step-{self.step:08d}"
        weights = self.export_state_dict() if self.sharded else None
        params = self._full(self.trainable)
        ema = self._full(self.ema.shadow) if self.ema is not None else None
        optimizer = self.optimizer.state_dict()
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optimizer = get_optimizer_state_dict(self.runner, self.optimizer, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
        if self.world.rank == 0:
            tmp = final.with_name(final.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            self.write_released(tmp, weights)
            state = {
                "step": self.step,
                "sharding": "fsdp" if self.sharded else "none",
                "params": params,
                "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(),
                "ema": ema,
                "history": self.history,
                "elapsed": self.elapsed,
                "data_counts": self.data.counts.to_dict(),
            }
            torch.save(state, tmp / STATE)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        if self.world.distributed:
            import torch.distributed as dist

            dist.barrier()
        return final

    def _load_latest(self) -> None:
        folder = latest_checkpoint(self.out)
        if folder is None:
            return
        state = torch.load(folder / STATE, map_location="cpu", weights_only=False)
        if (state.get("sharding", "none") == "fsdp") != self.sharded:
            raise TrainingError(f"{folder} was written with sharding={state.get('sharding', 'none')}; resume it "
                                f"with the same sharding (sharding=fsdp with several processes, or not)")
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(self._local(state["params"][name], p))
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.runner, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.shadow = {k: self._local(v, self.trainable[k]).float() for k, v in state["ema"].items()}
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.elapsed = float(state["elapsed"])
        for _ in range(self.step):  # the data stream is deterministic: skip the packs already trained on
            next(self.packs)
        log.info("resumed", extra={"checkpoint": str(folder), "step": self.step})

    def _local(self, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``full`` (a whole CPU tensor) placed like ``like``: this process's shard of it in sharded mode."""
        full = full.to(like.device, like.dtype)
        if self.sharded:
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(full, like.device_mesh, like.placements)
        return full

    def finish(self, started: float) -> dict:
        """Write the finished version (released layout + manifest) into ``output_dir``; returns the manifest."""
        manifest = {
            "format": "echo4o-finetune/1",
            "base_model": self.config.base_model,
            "data": {"source": self.config.data, **self.data.counts.to_dict()},
            "mode": self.config.mode,
            "lora_export": self.config.lora_export if self.config.mode == "lora" else None,
            "hyperparameters": self.config.model_dump(),
            "steps": self.step,
            "final_loss": self.history[-1] if self.history else None,
            "loss_first": self.history[0] if self.history else None,
            "world_size": self.world.size,
            "sharding": "fsdp" if self.sharded else "none",
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "train_seconds": round(self.elapsed, 2),
            "code_revision": code_revision(),
        }
        weights = self.export_state_dict() if self.sharded else None
        if self.world.rank == 0:
            self.write_released(self.out, weights)
            (self.out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        return manifest


class _LossRunner(torch.nn.Module):
    """The FSDP root: its forward is :func:`forward_loss` of the wrapped model (which calls the submodules
    directly), so FSDP's root hooks gather and reduce the parameters outside the decoder layers."""

    def __init__(self, model: torch.nn.Module, checkpointing: bool):
        super().__init__()
        self.model = model
        self.checkpointing = checkpointing

    def forward(self, batch):
        out = forward_loss(self.model, batch, checkpointing=self.checkpointing)
        return out.mse_sum, out.mse_tokens, out.ce_sum, out.ce_tokens


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint folder under ``out`` (one with ``trainer_state.pt``), or None."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp") and (p / STATE).is_file())
    return done[-1] if done else None


def code_revision() -> str:
    """The git commit of this code (``ECHO4O_CODE_REVISION`` overrides; ``unknown`` outside a checkout)."""
    if os.environ.get("ECHO4O_CODE_REVISION"):
        return os.environ["ECHO4O_CODE_REVISION"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _resolved_path(source: str) -> str:
    from worker.engine.loading import resolve_checkpoint

    return str(resolve_checkpoint(source))


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


