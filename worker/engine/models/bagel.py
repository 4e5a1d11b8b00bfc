"""The top-level BAGEL model: the MoT LLM, the SigLIP NaViT encoder and the generation heads.

Parameter names match the released ``ema.safetensors``. Besides the modules, this class knows how each kind
of input enters the LLM's KV cache (text, ViT image tokens, VAE image tokens) and runs one flow-velocity
prediction of the latent query against one or more fixed contexts (the CFG branches) in one packed forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from worker.engine.config import BagelConfig
from worker.engine.models.embeddings import (
    MLPConnector,
    PositionEmbedding,
    TimestepEmbedder,
    flattened_position_ids,
)
from worker.engine.models.qwen2_mot import UND, BranchPlan, KVCache, PrefillPlan, Qwen2MoTForCausalLM, Route
from worker.engine.models.siglip_navit import SiglipNaViTModel, patchify


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens that frame text (``<|im_start|>``/``<|im_end|>``) and images (vision start/end)."""

    bos: int
    eos: int
    start_of_image: int
    end_of_image: int


@dataclass
class DenoiseLayout:
    """Everything about a packed velocity query that stays fixed over the denoising steps."""

    plan: BranchPlan
    rope: tuple[torch.Tensor, torch.Tensor]
    route: Route
    num_branches: int
    num_tokens: int
    #: Which latent each packed row (branch) queries with: ``None`` when every row shares one latent
    #: (``x_t`` of shape ``(tokens, D)``), else one index per row into ``x_t`` of shape ``(latents, tokens, D)``.
    sources: torch.Tensor | None = None


class Bagel(nn.Module):
    """BAGEL: one decoder-only transformer that reads text and images and generates images by flow matching.

    Parts (attribute names are the released checkpoint's):

    - ``language_model``: a Qwen2 LLM (:class:`Qwen2MoTForCausalLM`) whose every layer is a mixture of two
      transformers: the understanding weights and a generation expert of the same shape (names ending in
      ``_moe_gen``), with one final norm each.
    - ``vit_model`` + ``connector`` + ``vit_pos_embed``: a SigLIP NaViT encoder (any aspect ratio, patch conv as
      a Linear), a Linear-GELU-Linear connector into the LLM width and a 2-D sin-cos position table; an image
      seen this way becomes *ViT tokens*.
    - ``vae2llm`` + ``time_embedder`` + ``latent_pos_embed`` and ``llm2vae``: FLUX VAE latents cut into
      ``p x p`` patches enter the LLM as *latent tokens* (Linear + timestep embedding + 2-D position), and the
      LLM's hidden states at those rows leave through ``llm2vae`` as the predicted velocity.

    MoT routing: text, the special tokens that frame images, and ViT tokens go through the understanding
    weights; latent tokens (clean reference latents, or the noisy latent being denoised) go through the
    ``_moe_gen`` expert. Both kinds share one attention over the whole sequence, so every token can attend to
    every earlier one whichever weights produced its keys. Which rows use which expert is a :class:`Route`.

    Inference here is split the way the sampler needs it: ``prefill_text`` / ``prefill_vit_image`` /
    ``prefill_vae_image`` append one context segment to a :class:`KVCache`; ``denoise_layout`` fixes how a
    latent query attends to one or more finished contexts (the CFG branches); ``velocity`` runs one step's
    prediction for all branches in one packed forward. The VAE itself is not part of this module.
    """

    def __init__(self, config: BagelConfig):
        """Build every part from ``config`` (parameters uninitialised: load weights or randomise them after;
        build under ``torch.device("meta")`` to allocate nothing)."""
        super().__init__()
        self.config = config
        hidden = config.llm.hidden_size
        self.hidden_size = hidden
        self.language_model = Qwen2MoTForCausalLM(config.llm)
        self.time_embedder = TimestepEmbedder(hidden)
        self.vae2llm = nn.Linear(config.patch_latent_dim, hidden)
        self.llm2vae = nn.Linear(hidden, config.patch_latent_dim)
        self.latent_pos_embed = PositionEmbedding(config.max_latent_size, hidden)
        self.vit_model = SiglipNaViTModel(config.vit)
        self.connector = MLPConnector(config.vit.hidden_size, hidden, config.connector_act)
        self.vit_pos_embed = PositionEmbedding(config.vit_max_num_patch_per_side, hidden)
        #: The decoder stack the denoising steps run: ``None`` for ``self.llm`` itself, or a compiled version
        #: of its forward (``torch.compile``, see ``Echo4oPipeline.from_pretrained(compile=True)``).
        self._step_llm = None

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def llm(self):
        """The decoder stack (embeddings, MoT layers, norms, RoPE) without the text head."""
        return self.language_model.model

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the LLM-side weights (what hidden states are cast to)."""
        return self.vae2llm.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the latent projections live (with a device map: where inputs are placed)."""
        return self.vae2llm.weight.device

    def new_cache(self) -> KVCache:
        """An empty context: no tokens, next RoPE position 0."""
        return KVCache(self.config.llm.num_hidden_layers)

    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        """Token embeddings ``(len(ids), hidden)`` of ``ids``."""
        return self.llm.embed_tokens(torch.tensor(ids, dtype=torch.long, device=self.device))

    def pack_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """``(C, h*p, w*p)`` VAE latent -> ``(h*w, p*p*C)`` tokens (features in ``(p, q, c)`` order)."""
        return patchify(latent, self.config.latent_patch_size)

    def unpack_latent(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``(h*w, p*p*C)`` tokens -> ``(1, C, h*p, w*p)``."""
        h, w = grid
        p, c = self.config.latent_patch_size, self.config.latent_channels
        x = tokens.reshape(1, h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(1, c, h * p, w * p)

    def latent_position_ids(self, grid: tuple[int, int]) -> torch.Tensor:
        """Row-major indices into the latent position table for an ``(h, w)`` token grid."""
        h, w = grid
        return flattened_position_ids(h, w, 1, self.config.max_latent_size).to(self.device)

    def embed_latents(self, tokens: torch.Tensor, t: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Latent tokens into the LLM width: ``vae2llm(x) + timestep(t) + position``."""
        return (self.vae2llm(tokens.to(self.dtype)) + self.time_embedder(t.reshape(1).to(self.device))
                + self.latent_pos_embed(position_ids))

    # ------------------------------------------------------------------------------------------ prefill
    def _prefill(self, cache: KVCache, seq: torch.Tensor, positions: torch.Tensor, causal: bool,
                 route: Route, backend: str) -> None:
        plan = PrefillPlan(cache, seq.shape[0], causal, backend, seq.device)
        self.llm(seq, self.llm.rope(positions), plan, route, final_norm=False)
        cache.length += seq.shape[0]

    @torch.inference_mode()
    def prefill_text(self, cache: KVCache, ids: list[int], special: SpecialTokens, backend: str) -> None:
        """``<|im_start|> ids <|im_end|>``, causal, one RoPE position per token."""
        ids = [special.bos, *ids, special.eos]
        positions = torch.arange(cache.rope, cache.rope + len(ids), device=self.device)
        self._prefill(cache, self.embed_ids(ids), positions, True, UND, backend)
        cache.rope += len(ids)

    @torch.inference_mode()
    def prefill_vit_image(self, cache: KVCache, image: torch.Tensor, special: SpecialTokens, backend: str) -> None:
        """ViT tokens of one ``(3, H, W)`` image (H, W multiples of the patch size), framed by vision
        start/end, full attention inside, one shared RoPE position."""
        cfg = self.config
        patch = cfg.vit.patch_size
        pos_ids = flattened_position_ids(image.shape[1], image.shape[2], patch,
                                         cfg.vit_max_num_patch_per_side).to(self.device)
        vit_dtype = self.vit_model.vision_model.embeddings.patch_embedding.weight.dtype
        patches = patchify(image, patch).to(self.device, vit_dtype)
        n = patches.shape[0]
        cu = torch.tensor([0, n], dtype=torch.int32, device=self.device)
        feats = self.vit_model(patches, pos_ids, cu, n, backend)
        feats = self.connector(feats) + self.vit_pos_embed(pos_ids)
        seq = torch.cat([self.embed_ids([special.start_of_image]), feats.to(self.dtype),
                         self.embed_ids([special.end_of_image])])
        positions = torch.full((n + 2,), cache.rope, dtype=torch.long, device=self.device)
        self._prefill(cache, seq, positions, False, UND, backend)
        cache.rope += 1

    @torch.inference_mode()
    def prefill_vae_image(self, cache: KVCache, latent: torch.Tensor, special: SpecialTokens,
                          backend: str) -> None:
        """Clean VAE tokens (timestep 0) of one ``(C, h*p, w*p)`` latent, framed by vision start/end, through
        the generation expert (the frame tokens through the plain weights), one shared RoPE position."""
        p = self.config.latent_patch_size
        grid = (latent.shape[1] // p, latent.shape[2] // p)
        tokens = self.pack_latent(latent)
        n = tokens.shape[0]
        emb = self.embed_latents(tokens, torch.zeros(1, device=self.device), self.latent_position_ids(grid))
        seq = torch.cat([self.embed_ids([special.start_of_image]), emb.to(self.dtype),
                         self.embed_ids([special.end_of_image])])
        route = Route(und=torch.tensor([0, n + 1], device=self.device),
                      gen=torch.arange(1, n + 1, device=self.device))
        positions = torch.full((n + 2,), cache.rope, dtype=torch.long, device=self.device)
        self._prefill(cache, seq, positions, False, route, backend)
        cache.rope += 1

    # ------------------------------------------------------------------------------------------ denoising
    def denoise_layout(self, contexts: list[KVCache], num_tokens: int, backend: str,
                       sources: list[int] | None = None) -> DenoiseLayout:
        """The packed query ``[start, latents, end]`` once per context, each against its own context.

        ``sources``: for a query of several latents (the images of a batch of requests), which latent each
        context's row reads (one index per context); ``None``: every row reads the same single latent.
        """
        device = self.device
        if sources is not None and len(sources) != len(contexts):
            raise ValueError(f"one source latent per context; got {len(sources)} for {len(contexts)}")
        seg = num_tokens + 2
        plan = BranchPlan(contexts, [seg] * len(contexts), backend, device)
        positions = torch.cat([torch.full((seg,), c.rope, dtype=torch.long) for c in contexts]).to(device)
        base = torch.arange(len(contexts), device=device) * seg
        und = torch.stack([base, base + seg - 1], dim=1).flatten()
        gen = (base[:, None] + torch.arange(1, seg - 1, device=device)[None]).flatten()
        return DenoiseLayout(plan=plan, rope=self.llm.rope(positions), route=Route(und=und, gen=gen),
                             num_branches=len(contexts), num_tokens=num_tokens,
                             sources=None if sources is None else torch.tensor(sources, device=device))

    @torch.inference_mode()
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, layout: DenoiseLayout, frame: tuple[torch.Tensor,
                 torch.Tensor], position_ids: torch.Tensor) -> torch.Tensor:
        """Predicted ``noise - data`` for latent tokens ``x_t`` at time ``t``: ``(branches, tokens, p*p*C)``.

        ``x_t``: ``(tokens, D)``, one latent every row queries with; or, with a layout built with ``sources``,
        ``(latents, tokens, D)``, row ``r`` querying with ``x_t[sources[r]]`` (the rows of a request batch).
        """
        start, end = frame
        if layout.sources is None:
            lat = self.embed_latents(x_t, t, position_ids).to(self.dtype)
            seq = torch.cat([start, lat, end] * layout.num_branches)
        else:
            num, tokens, dim = x_t.shape
            lat = self.vae2llm(x_t.reshape(num * tokens, dim).to(self.dtype)).view(num, tokens, -1)
            lat = (lat + self.time_embedder(t.reshape(1).to(self.device))
                   + self.latent_pos_embed(position_ids)).to(self.dtype)
            rows = lat.index_select(0, layout.sources)
            width = rows.shape[-1]
            seq = torch.cat([start.expand(rows.shape[0], 1, width), rows, end.expand(rows.shape[0], 1, width)],
                            dim=1).reshape(-1, width)
        llm = self._step_llm if self._step_llm is not None else self.llm
        hidden = llm(seq, layout.rope, layout.plan, layout.route, final_norm=False)
        hidden = hidden.view(layout.num_branches, layout.num_tokens + 2, -1)[:, 1:-1]  # the latent rows
        return self.llm2vae(self.llm.norm_moe_gen(hidden))

    # ------------------------------------------------------------------------------------------ init
    def reset_position_tables(self) -> None:
        """Fill both position tables with their fixed 2-D sin-cos values (after a random initialisation)."""
        self.latent_pos_embed.reset_table()
        self.vit_pos_embed.reset_table()
