"""The training objective of BAGEL / Echo-4o: a differentiable forward over a pack of samples, flow-matching MSE
on the target image and cross-entropy on text, built from the engine's modules.

One sample becomes one sequence (the engine's context order, then the target):

    [ref 1 VAE tokens][ref 1 ViT tokens] ... [ref k VAE][ref k ViT] [<|im_start|> text <|im_end|>] [target]

Each image segment is ``<|vision_start|> tokens <|vision_end|>`` and takes one RoPE position; text takes one
position per token. Clean reference latents enter with timestep 0; the target's latent tokens are noised.

Condition dropout, drawn per sample (the reference's ``*_cond_dropout_prob``): the text segment is left out
with probability ``text`` (no RoPE position used), each reference's ViT segment with ``vit`` and its VAE segment
with ``vae`` (each still uses its RoPE position, as the reference does). The target is never dropped.

Attention (:func:`attention_mask`, per sample, samples never see each other): a token sees every earlier
segment and its own segment, causally inside text, fully inside an image; the noised target's tokens are
hidden from every other segment ("noised tokens hidden from later tokens").

Flow matching on the target latent ``x0`` (packed ``(h*w, p*p*C)`` tokens) with noise ``eps ~ N(0, 1)``:
``t = sigmoid(n)``, ``n ~ N(0, 1)``, shifted ``t' = s t / (1 + (s - 1) t)``; ``x_t = (1 - t') x0 + t' eps``; the
model predicts the velocity ``eps - x0`` (pointing from data to noise, as the sampler integrates it) and the
loss is its squared error, averaged over the 64 features of a token and summed over tokens (the trainer divides
by the number of target tokens of the whole global batch). Cross-entropy applies to text segments marked for
it (``text_loss``): each of ``<|im_start|> ids`` predicts the next token, the last one ``<|im_end|>``.

Random draws of one sample come from its own CPU generator, in this order: text dropout, then per reference
VAE dropout and ViT dropout, the timestep normal, the VAE posterior noise of each kept reference and of the
target, then ``eps``. A sample's draws depend on its generator only, so where it is computed (which process,
which pack position) does not change them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image

from worker.engine.image_processing import to_normalized_tensor
from worker.engine.models.bagel import Bagel, SpecialTokens
from worker.engine.models.embeddings import flattened_position_ids
from worker.engine.models.qwen2_mot import Route
from worker.engine.models.siglip_navit import patchify
from worker.engine.models.vae import FluxVAE
from worker.training.data import Sample
from worker.training.packing import ImageRules

CAUSAL, FULL, NOISE = "causal", "full", "noise"


# ---------------------------------------------------------------------------------------------------
# flow-matching math
# ---------------------------------------------------------------------------------------------------


def shift_timestep(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``s t / (1 + (s - 1) t)``: with ``s > 1`` more of the training lands on noisier times."""
    return shift * t / (1 + (shift - 1) * t)


def sample_timestep(generator: torch.Generator, shift: float) -> torch.Tensor:
    """One training time in (0, 1): ``shift_timestep(sigmoid(n), shift)`` with ``n ~ N(0, 1)`` from ``generator``."""
    n = torch.randn((), generator=generator, dtype=torch.float32)
    return shift_timestep(torch.sigmoid(n), shift)


def noised(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t eps`` (``t`` broadcast over the last dim when it is per token)."""
    t = t[..., None] if t.dim() == x0.dim() - 1 else t
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict at ``x_t``: ``d x_t / d t = eps - x0``."""
    return eps - x0


def attention_mask(split_lens: list[int], modes: list[str]) -> torch.Tensor:
    """Boolean ``(n, n)`` mask of one sample, True where a query row may attend a key column (module doc)."""
    n = sum(split_lens)
    mask = torch.zeros(n, n, dtype=torch.bool)
    start = 0
    for length, mode in zip(split_lens, modes, strict=True):
        if mode not in (CAUSAL, FULL, NOISE):
            raise ValueError(f"segment mode must be {CAUSAL}, {FULL} or {NOISE}; got {mode!r}")
        end = start + length
        mask[start:end, :start] = True
        block = torch.ones(length, length, dtype=torch.bool)
        mask[start:end, start:end] = block.tril() if mode == CAUSAL else block
        start = end
    start = 0
    for length, mode in zip(split_lens, modes, strict=True):
        if mode == NOISE:
            end = start + length
            mask[:, start:end] = False
            mask[start:end, start:end] = True
        start += length
    return mask


# ---------------------------------------------------------------------------------------------------
# the packed sequence
# ---------------------------------------------------------------------------------------------------


@dataclass
class DropoutConfig:
    """Probabilities of leaving a condition out of a training sample (Echo-4o's values)."""

    text: float = 0.1
    vit: float = 0.3
    vae: float = 0.3


@dataclass
class PackedBatch:
    """Everything one forward needs, with sequence row indexes. Built by :func:`build_batch`."""

    length: int = 0
    text_ids: list[int] = field(default_factory=list)
    text_rows: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    gen_rows: list[int] = field(default_factory=list)
    # ViT images: (patches, position ids, rows)
    vit: list[tuple[torch.Tensor, torch.Tensor, list[int]]] = field(default_factory=list)
    # VAE images: (clean latent tokens, t, latent position ids, rows, eps or None)
    vae: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], torch.Tensor | None]] = field(
        default_factory=list)
    sample_lens: list[int] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)
    ce_rows: list[int] = field(default_factory=list)
    ce_labels: list[int] = field(default_factory=list)

    @property
    def mse_tokens(self) -> int:
        return sum(len(rows) for _, _, _, rows, eps in self.vae if eps is not None)

    @property
    def ce_tokens(self) -> int:
        return len(self.ce_rows)


class Preprocessor:
    """Turns samples into a :class:`PackedBatch`: resizes images by ``rules``, encodes them with the frozen VAE,
    tokenizes text, draws dropout, timesteps and noise from each sample's generator."""

    def __init__(self, model: Bagel, vae: FluxVAE, encode, special: SpecialTokens, rules: ImageRules,
                 dropout: DropoutConfig, timestep_shift: float = 1.0, text_loss: bool = False):
        self.model = model
        self.vae = vae
        self.encode = encode
        self.special = special
        self.rules = rules
        self.dropout = dropout
        self.timestep_shift = timestep_shift
        self.text_loss = text_loss

    @property
    def config(self):
        return self.model.config

    def vae_image(self, image: Image.Image) -> Image.Image:
        step = self.config.latent_downsample
        return image.resize(self.rules.vae_size(image.width, image.height, step), Image.Resampling.BICUBIC)

    def vit_image(self, image: Image.Image) -> Image.Image:
        patch = self.config.vit.patch_size
        return image.resize(self.rules.vit_size(image.width, image.height, patch), Image.Resampling.BICUBIC)

    @torch.no_grad()
    def latent_tokens(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        """Packed clean latent tokens ``(h*w, p*p*C)`` of an image already at the VAE size (posterior sample)."""
        vae_param = next(self.vae.parameters())
        pixels = to_normalized_tensor(image)[None].to(vae_param.device, vae_param.dtype)
        latent = self.vae.encode(pixels, generator)[0]
        return patchify(latent.float(), self.config.latent_patch_size)

    def build(self, samples: list[Sample], generators: list[torch.Generator]) -> PackedBatch:
        batch = PackedBatch()
        for sample, generator in zip(samples, generators, strict=True):
            self._add(batch, sample, generator)
        return batch

    def _add(self, b: PackedBatch, sample: Sample, g: torch.Generator) -> None:
        special, cfg = self.special, self.config
        drop_text = bool(torch.rand((), generator=g) < self.dropout.text)
        drops = [(bool(torch.rand((), generator=g) < self.dropout.vae), bool(torch.rand((), generator=g)
                  < self.dropout.vit)) for _ in sample.references]
        t = sample_timestep(g, self.timestep_shift)
        start, rope = b.length, 0
        split_lens: list[int] = []
        modes: list[str] = []

        def frame(rows_inside: int) -> tuple[int, list[int]]:
            """Append a framed image segment of ``rows_inside`` tokens; return its first row and inner rows."""
            first = b.length
            b.text_ids += [special.start_of_image, special.end_of_image]
            b.text_rows += [first, first + rows_inside + 1]
            b.positions += [rope] * (rows_inside + 2)
            b.length += rows_inside + 2
            return first, list(range(first + 1, first + 1 + rows_inside))

        def add_latent(image: Image.Image, timestep: torch.Tensor, eps_shape_ok: bool) -> None:
            sized = self.vae_image(image)
            x0 = self.latent_tokens(sized, g)
            step = cfg.latent_downsample
            pos = flattened_position_ids(sized.height, sized.width, step, cfg.max_latent_size)
            _, rows = frame(x0.shape[0])
            b.gen_rows += rows
            eps = torch.randn(x0.shape, generator=g, dtype=torch.float32) if eps_shape_ok else None
            b.vae.append((x0, timestep, pos, rows, eps))
            split_lens.append(x0.shape[0] + 2)

        for ref, (drop_vae, drop_vit) in zip(sample.references, drops, strict=True):
            sized = self.vae_image(ref)
            if not drop_vae:
                add_latent(ref, torch.zeros(()), False)
                modes.append(FULL)
            rope += 1
            if not drop_vit:
                vit_img = self.vit_image(sized)
                patch = cfg.vit.patch_size
                patches = patchify(to_normalized_tensor(vit_img), patch)
                pos = flattened_position_ids(vit_img.height, vit_img.width, patch, cfg.vit_max_num_patch_per_side)
                _, rows = frame(patches.shape[0])
                b.vit.append((patches, pos, rows))
                split_lens.append(patches.shape[0] + 2)
                modes.append(FULL)
            rope += 1
        if sample.text and not drop_text:
            ids = [special.bos, *self.encode(sample.text), special.eos]
            first = b.length
            b.text_ids += ids
            b.text_rows += list(range(first, first + len(ids)))
            b.positions += list(range(rope, rope + len(ids)))
            if self.text_loss:
                b.ce_rows += list(range(first, first + len(ids) - 1))
                b.ce_labels += ids[1:]
            b.length += len(ids)
            rope += len(ids)
            split_lens.append(len(ids))
            modes.append(CAUSAL)
        add_latent(sample.target, t, True)
        modes.append(NOISE)
        b.sample_lens.append(b.length - start)
        b.masks.append(attention_mask(split_lens, modes))


# ---------------------------------------------------------------------------------------------------
# the forward
# ---------------------------------------------------------------------------------------------------


class TrainingPlan:
    """The attention plan of a training forward (the interface of the engine's plans: ``keys_values`` and
    ``attend``): no cache, each sample attends over itself under its own boolean mask."""

    def __init__(self, sample_lens: list[int], masks: list[torch.Tensor], device: torch.device):
        self.bounds = [0]
        for n in sample_lens:
            self.bounds.append(self.bounds[-1] + n)
        self.masks = [m.to(device) for m in masks]

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        outs = []
        for i, mask in enumerate(self.masks):
            a, z = self.bounds[i], self.bounds[i + 1]
            qi = q[a:z].transpose(0, 1)[None]
            ki = k[a:z].repeat_interleave(groups, dim=1).transpose(0, 1)[None]
            vi = v[a:z].repeat_interleave(groups, dim=1).transpose(0, 1)[None]
            out = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=1.0 / math.sqrt(q.shape[-1]))
            outs.append(out[0].transpose(0, 1))
        return torch.cat(outs, dim=0)


@dataclass
class PackLoss:
    """Summed losses of one pack and the token counts they are summed over."""

    mse_sum: torch.Tensor
    mse_tokens: int
    ce_sum: torch.Tensor
    ce_tokens: int


def forward_loss(model: Bagel, batch: PackedBatch, *, checkpointing: bool = False) -> PackLoss:
    """The differentiable forward of a pack: summed per-token MSE (mean over features) on the noised targets
    and summed cross-entropy on the marked text rows."""
    device, hidden = model.device, model.hidden_size
    llm = model.llm
    dtype = model.dtype
    seq = torch.zeros(batch.length, hidden, device=device, dtype=dtype)
    text_rows = torch.tensor(batch.text_rows, dtype=torch.long, device=device)
    seq = seq.index_copy(0, text_rows, llm.embed_tokens(torch.tensor(batch.text_ids, device=device)).to(dtype))
    if batch.vit:
        patches = torch.cat([p for p, _, _ in batch.vit]).to(device)
        pos = torch.cat([p for _, p, _ in batch.vit]).to(device)
        lens = [p.shape[0] for p, _, _ in batch.vit]
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        feats = model.vit_model(patches.to(model.vit_model.vision_model.embeddings.patch_embedding.weight.dtype),
                                pos, cu, max(lens), "sdpa")
        feats = model.connector(feats) + model.vit_pos_embed(pos)
        rows = torch.tensor([r for _, _, rs in batch.vit for r in rs], dtype=torch.long, device=device)
        seq = seq.index_copy(0, rows, feats.to(dtype))
    x0 = torch.cat([x for x, _, _, _, _ in batch.vae]).to(device)
    t = torch.cat([tt.reshape(1).expand(x.shape[0]) for x, tt, _, _, _ in batch.vae]).to(device)
    eps = torch.cat([e if e is not None else torch.zeros_like(x) for x, _, _, _, e in batch.vae]).to(device)
    is_target = torch.cat([torch.full((x.shape[0],), e is not None) for x, _, _, _, e in batch.vae]).to(device)
    x_t = noised(x0, eps, t)
    lat_pos = torch.cat([p for _, _, p, _, _ in batch.vae]).to(device)
    lat = model.vae2llm(x_t.to(dtype)) + model.time_embedder(t) + model.latent_pos_embed(lat_pos)
    vae_rows = torch.tensor([r for _, _, _, rs, _ in batch.vae for r in rs], dtype=torch.long, device=device)
    seq = seq.index_copy(0, vae_rows, lat.to(dtype))

    und = sorted(set(range(batch.length)) - set(batch.gen_rows))
    route = Route(und=torch.tensor(und, dtype=torch.long, device=device) if und else None,
                  gen=torch.tensor(batch.gen_rows, dtype=torch.long, device=device))
    plan = TrainingPlan(batch.sample_lens, batch.masks, device)
    rope = llm.rope(torch.tensor(batch.positions, dtype=torch.long, device=device))
    x = seq
    for layer in llm.layers:
        if checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(layer, x, rope, plan, route, use_reentrant=False)
        else:
            x = layer(x, rope, plan, route)
    x = route.apply(x, llm.norm, llm.norm_moe_gen)

    target_rows = vae_rows[is_target]
    pred = model.llm2vae(x[target_rows]).float()
    mse = (pred - velocity_target(x0, eps)[is_target]).pow(2).mean(dim=-1)
    ce_sum = x.new_zeros((), dtype=torch.float32)
    if batch.ce_rows:
        logits = model.language_model.lm_head(x[torch.tensor(batch.ce_rows, device=device)]).float()
        ce_sum = F.cross_entropy(logits, torch.tensor(batch.ce_labels, device=device), reduction="sum")
    return PackLoss(mse_sum=mse.sum(), mse_tokens=int(mse.shape[0]), ce_sum=ce_sum, ce_tokens=len(batch.ce_rows))
