"""The Qwen2 mixture-of-transformers LLM of BAGEL, over packed sequences with a KV cache.

Every decoder layer holds two experts: the plain Qwen2 weights (text, special and ViT tokens) and a copy with
the suffix ``_moe_gen`` (VAE latent tokens). Both experts share one attention over the whole sequence. Which
rows of a packed query use which expert is a :class:`Route`; how the keys and values of earlier tokens are
found is an attention *plan* (:class:`PrefillPlan` while building a context, :class:`BranchPlan` while
denoising against fixed contexts). The building blocks (RMSNorm, MLP, rotary embedding) are transformers'.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
)

from worker.engine.attention import packed_attention


@dataclass(frozen=True)
class Route:
    """Rows of a packed query for the understanding weights (``und``) and the generation expert (``gen``).

    ``None`` for one side means "no rows". With ``gen is None`` every row uses the understanding weights (text
    and ViT tokens), with ``und is None`` every row uses the generation expert. Every operation routed here is
    row-wise, so when the generation rows are the majority (a latent query framed by two special tokens) the
    expert runs over all rows and only the few understanding rows are recomputed and overwritten: no gather or
    scatter of the large part.
    """

    und: torch.Tensor | None = None
    gen: torch.Tensor | None = None

    def apply(self, x: torch.Tensor, f_und: Callable[[torch.Tensor], torch.Tensor],
              f_gen: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.gen is None:
            return f_und(x)
        if self.und is None:
            return f_gen(x)
        und = _on(self.und, x.device)
        if self.gen.numel() >= und.numel():
            out = f_gen(x)
            out[und] = f_und(x[und]).to(out.dtype)
            return out
        gen = _on(self.gen, x.device)
        out = f_und(x)
        out[gen] = f_gen(x[gen]).to(out.dtype)
        return out


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` (a no-op unless layers are spread over several devices)."""
    return t if t.device == device else t.to(device)


UND = Route()


class KVCache:
    """Keys and values of one context, per layer ``(tokens, kv_heads, head_dim)``, plus where it ends.

    ``length`` counts cached tokens; ``rope`` is the next RoPE position (an image takes one position).
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0
        self.rope = 0

    def snapshot(self) -> KVCache:
        """A cheap copy sharing the tensors (prefill replaces them, never writes into them)."""
        other = KVCache(len(self.keys))
        other.keys, other.values = list(self.keys), list(self.values)
        other.length, other.rope = self.length, self.rope
        return other


class _Plan:
    """The packed sequences of one forward (query and key lengths, causal or not) and how to attend over them.

    The ``sdpa`` backend reads sequence lengths on the host, so its cumulative lengths stay on the CPU (no
    device synchronisation per layer), and several sequences are attended one call each: a block-diagonal
    mask over all of them would spend time and memory on the masked-out cells. The other backends take the
    whole pack in one call.
    """

    def __init__(self, lens_q: list[int], lens_k: list[int], causal: bool, backend: str, device: torch.device):
        self.causal = causal
        self.backend = backend
        self.lens_q, self.lens_k = lens_q, lens_k
        cu_device = torch.device("cpu") if backend == "sdpa" else device
        self.cu_q = torch.tensor([0, *_cumsum(lens_q)], dtype=torch.int32, device=cu_device)
        self.cu_k = torch.tensor([0, *_cumsum(lens_k)], dtype=torch.int32, device=cu_device)
        self.max_q, self.max_k = max(lens_q), max(lens_k)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.backend != "sdpa":
            return packed_attention(q, k, v, _on(self.cu_q, q.device), _on(self.cu_k, q.device), self.max_q,
                                    self.max_k, self.causal, self.backend)
        if len(self.lens_q) == 1:
            return packed_attention(q, k, v, self.cu_q, self.cu_k, self.max_q, self.max_k, self.causal, "sdpa")
        outs, oq, ok = [], 0, 0
        for lq, lk in zip(self.lens_q, self.lens_k, strict=True):
            cu_q = torch.tensor([0, lq], dtype=torch.int32)
            cu_k = torch.tensor([0, lk], dtype=torch.int32)
            outs.append(packed_attention(q[oq:oq + lq], k[ok:ok + lk], v[ok:ok + lk], cu_q, cu_k, lq, lk,
                                         self.causal, "sdpa"))
            oq, ok = oq + lq, ok + lk
        return torch.cat(outs, dim=0)


class PrefillPlan(_Plan):
    """One new segment appended to ``cache``: its queries see the whole cache plus the segment
    (causally for text, fully inside an image); the merged keys and values become the cache."""

    def __init__(self, cache: KVCache, query_len: int, causal: bool, backend: str, device: torch.device):
        super().__init__([query_len], [cache.length + query_len], causal, backend, device)
        self.cache = cache

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past_k, past_v = self.cache.keys[layer], self.cache.values[layer]
        if past_k is not None:
            k = torch.cat([_on(past_k, k.device), k], dim=0)
            v = torch.cat([_on(past_v, v.device), v], dim=0)
        self.cache.keys[layer], self.cache.values[layer] = k, v
        return k, v


class BranchPlan(_Plan):
    """Several query segments packed together, segment ``b`` attending (fully) to context ``b`` plus itself.

    Used by the denoising loop: the contexts never change, so each layer's keys and values live in one
    preallocated buffer ``[ctx_0, q_0, ctx_1, q_1, ...]`` where only the query slots are rewritten per step.
    """

    def __init__(self, contexts: list[KVCache], query_lens: list[int], backend: str, device: torch.device):
        if len(contexts) != len(query_lens):
            raise ValueError("one query length per context")
        lens_k = [c.length + q for c, q in zip(contexts, query_lens, strict=True)]
        super().__init__(list(query_lens), lens_k, False, backend, device)
        num_layers = len(contexts[0].keys)
        slots, start = [], 0
        for c, q in zip(contexts, query_lens, strict=True):
            slots.append(torch.arange(start + c.length, start + c.length + q))
            start += c.length + q
        self.slots = torch.cat(slots).to(device)
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self._contexts = contexts
        self._query_lens = query_lens

    def _buffer(self, parts: list[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
        pieces = []
        for p, q in zip(parts, self._query_lens, strict=True):
            if p is not None:
                pieces.append(p.to(like.device, like.dtype))
            pieces.append(like.new_zeros((q, *like.shape[1:])))
        return torch.cat(pieces, dim=0)

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is None:
            self.keys[layer] = self._buffer([c.keys[layer] for c in self._contexts], k)
            self.values[layer] = self._buffer([c.values[layer] for c in self._contexts], v)
        kb, vb = self.keys[layer], self.values[layer]
        slots = _on(self.slots, kb.device)
        kb.index_copy_(0, slots, k.to(kb.dtype))
        vb.index_copy_(0, slots, v.to(vb.dtype))
        return kb, vb


def _cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


class MoTAttention(nn.Module):
    """Grouped-query attention with per-head q/k RMSNorm and RoPE; q/k/v/o and the norms exist twice."""

    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        eps = config.rms_norm_eps
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(self.hidden_size, q_out, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(self.hidden_size, kv_out, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(self.hidden_size, kv_out, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(q_out, self.hidden_size, bias=False))
            setattr(self, f"q_norm{suffix}", Qwen2RMSNorm(self.head_dim, eps=eps))
            setattr(self, f"k_norm{suffix}", Qwen2RMSNorm(self.head_dim, eps=eps))

    def _qk(self, x: torch.Tensor, gen: bool) -> torch.Tensor:
        """Normed queries and keys, ``(tokens, Hq + Hkv, head_dim)`` in float32 (as the reference's
        generation path: the norms and RoPE run in float32, attention in the model dtype)."""
        s = "_moe_gen" if gen else ""
        n = x.shape[0]
        q = getattr(self, "q_proj" + s)(x).view(n, self.num_heads, self.head_dim)
        k = getattr(self, "k_proj" + s)(x).view(n, self.num_kv_heads, self.head_dim)
        return torch.cat([getattr(self, "q_norm" + s)(q.float()), getattr(self, "k_norm" + s)(k.float())], dim=1)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], plan, route: Route) -> torch.Tensor:
        qk = route.apply(x, lambda t: self._qk(t, False), lambda t: self._qk(t, True))
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = route.apply(x, self.v_proj, self.v_proj_moe_gen).view(x.shape[0], self.num_kv_heads, self.head_dim)
        cos, sin = rope
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        dtype = x.dtype
        k_all, v_all = plan.keys_values(self.layer_idx, k.to(dtype), v)
        out = plan.attend(q.to(dtype), k_all, v_all)
        out = out.reshape(x.shape[0], self.num_heads * self.head_dim)
        return route.apply(out, self.o_proj, self.o_proj_moe_gen)


class MoTDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks, each norm and MLP duplicated for the generation expert."""

    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        self.self_attn = MoTAttention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.mlp_moe_gen = Qwen2MLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=eps)
        self.input_layernorm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], plan, route: Route) -> torch.Tensor:
        h = route.apply(x, self.input_layernorm, self.input_layernorm_moe_gen)
        x = x + self.self_attn(h, rope, plan, route)
        h = route.apply(x, lambda t: self.mlp(self.post_attention_layernorm(t)),
                        lambda t: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(t)))
        return x + h


class Qwen2MoTModel(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MoTDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 ``(cos, sin)``, each ``(tokens, head_dim)``, for the given positions."""
        probe = torch.empty(0, dtype=torch.float32, device=position_ids.device)
        cos, sin = self.rotary_emb(probe, position_ids[None])
        return cos[0], sin[0]

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], plan, route: Route = UND,
                final_norm: bool = True) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, rope, plan, route)
        if final_norm:
            x = route.apply(x, self.norm, self.norm_moe_gen)
        return x


class Qwen2MoTForCausalLM(nn.Module):
    """Holds the LLM and its (unused at image generation, but released) ``lm_head``."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = Qwen2MoTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
