"""Attention over packed variable-length sequences, with three interchangeable backends.

The engine packs several sequences (text segments, images, CFG branches) into one ``(total, heads, dim)``
tensor, the layout of ``flash_attn_varlen_func``. The two functions below are the whole interface the model
uses (a contract with ``worker/engine/models``):

``resolve_backend(requested, device, dtype=None) -> str``
    Turns ``auto | sdpa | xformers | flash_attn`` into the backend that will run. ``auto`` picks xformers,
    then flash_attn, then sdpa on CUDA, and sdpa elsewhere. Asking explicitly for a backend that is not
    installed, or that has no kernel for the device (or dtype), raises ``ValueError`` naming the fix. The
    choice is logged.

``packed_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, backend)``
    ``q``: ``(total_q, Hq, D)``; ``k``, ``v``: ``(total_k, Hkv, D)`` with ``Hq`` a multiple of ``Hkv``
    (grouped-query attention: query head ``h`` reads KV head ``h // (Hq // Hkv)``). ``cu_seqlens_*`` are int32
    cumulative lengths ``[0, l0, l0 + l1, ...]`` with one entry more than there are sequences, on the CPU or
    on ``q``'s device (sdpa and xformers read them on the host: CPU ones cost no device sync). Query token
    ``i`` of sequence ``b`` attends to the keys of sequence ``b`` only; with ``causal`` it sees keys up to
    ``i + len_k[b] - len_q[b]`` (causal mask aligned to the bottom-right corner, as flash-attn >= 2.1 and
    xformers' ``BlockDiagonalCausalFromBottomRightMask``). A query that sees no key gets zeros. Scale is
    ``1 / sqrt(D)``. Returns ``(total_q, Hq, D)`` in ``q``'s dtype.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from echo4o.logging import get_logger

log = get_logger(__name__)

BACKENDS = ("sdpa", "xformers", "flash_attn")
CHOICES = ("auto", *BACKENDS)
AUTO_ORDER_CUDA = ("xformers", "flash_attn", "sdpa")

# Above this many (query x key) mask cells, the sdpa backend runs sequence by sequence instead of one call
# with a block-diagonal mask (which spends compute and memory on the cells it masks out).
_SDPA_BLOCK_MASK_MAX_CELLS = 64 * 1024 * 1024

# xformers 0.0.35's wheel has no attention kernel of its own for NVIDIA cards: its memory_efficient_attention
# dispatches to PyTorch's kernels (``cutlassF-pt``: PyTorch's build of the CUTLASS kernel xformers wrote, and
# ``fa2F@...-pt``: PyTorch's FlashAttention-2), to the flash_attn package when one is installed (``fa2F@2.x``),
# or to the flash_attn_3 package on Hopper (``fa3F``). Its one compiled library holds 2:4-sparsity and
# attention-merge operators, which the engine does not use; it is built for torch 2.10.0 with CUDA 12.8 and
# loads beside a later torch where libcudart.so.12 is found (a cu128 build of torch, or the
# nvidia-cuda-runtime-cu12 wheel beside a CUDA 13 one), and whether it loads changes no attention operator.
# So xformers counts as running when a packed attention through its dispatcher runs on the card (the probe),
# and the operator it picked is logged and printed by ``echo4o doctor``.
XFORMERS_PAIRING = ("torch==2.13.0 from https://download.pytorch.org/whl/cu128 with xformers==0.0.35 "
                    "(the gpu extra)")
_INSTALL_HINT = {
    "xformers": f"install xformers beside a CUDA build of torch: {XFORMERS_PAIRING}; see README, GPU install",
    "flash_attn": "pip install flash-attn --no-build-isolation (needs CUDA, an Ampere or newer GPU)",
}


# ---------------------------------------------------------------------------------------------------
# backend selection
# ---------------------------------------------------------------------------------------------------


def resolve_backend(requested: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The backend that will run for ``requested`` (``auto`` or a backend name) on ``device``.

    ``dtype`` (optional) is the compute dtype; flash-attn has no float32 kernel, so ``auto`` skips it for
    float32 and an explicit ``flash_attn`` with float32 is an error.
    """
    device = torch.device(device)
    requested = (requested or "auto").strip().lower()
    if requested not in CHOICES:
        raise ValueError(f"attention backend {requested!r} is not one of {', '.join(CHOICES)}")
    if requested == "auto":
        names = AUTO_ORDER_CUDA if device.type == "cuda" else ("sdpa",)
    else:
        names = (requested,)
    availability: dict[str, tuple[bool, str]] = {}
    for name in names:  # probe in preference order; stop at the first usable one
        availability[name] = backend_availability(name, device, dtype)
        if availability[name][0]:
            break
    chosen = select_backend(requested, device.type, availability)
    fallback = {k: why for k, (ok, why) in availability.items() if not ok}
    if requested == "auto" and fallback and device.type == "cuda":
        log.warning("attention: auto fell back past " + ", ".join(fallback) + f" to {chosen}",
                    extra={"attention": chosen, "why": fallback})
    log.info(
        "attention backend chosen",
        extra={
            "requested": requested,
            "attention": chosen,
            "device": str(device),
            # xformers' dispatcher picks the kernel itself (cutlassF-pt, fa2F, fa3F...): name it
            "operator": (xformers_operator(device, dtype or torch.bfloat16) or None) if chosen == "xformers" else None,
            "unavailable": {k: why for k, (ok, why) in availability.items() if not ok} or None,
        },
    )
    return chosen


def select_backend(requested: str, device_type: str, availability: dict[str, tuple[bool, str]]) -> str:
    """The pure selection rule: ``availability`` maps a backend name to ``(usable, reason_if_not)``."""
    if requested == "auto":
        if device_type != "cuda":
            return "sdpa"
        for name in AUTO_ORDER_CUDA:
            if availability.get(name, (False, ""))[0]:
                return name
        return "sdpa"
    if requested == "sdpa":
        return "sdpa"
    ok, why = availability.get(requested, (False, "not checked"))
    if not ok:
        raise ValueError(
            f"attention backend {requested!r} cannot run here: {why}. "
            f"Use sdpa or auto instead (ECHO4O_ATTENTION=sdpa, or --attention sdpa on the command line), or "
            f"{_INSTALL_HINT[requested]}."
        )
    return requested


def backend_availability(name: str, device: torch.device, dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """``(True, "")`` when ``name`` can run on ``device`` (and ``dtype``), else ``(False, reason)``."""
    if name == "sdpa":
        return True, ""
    if device.type != "cuda":
        return False, f"{name} has no kernel for device {device.type!r} (it needs CUDA)"
    if name == "flash_attn" and dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return False, f"flash_attn has no {dtype} kernel (it needs float16 or bfloat16)"
    index = device.index if device.index is not None else (torch.cuda.current_device() if
                                                           torch.cuda.is_available() else 0)
    return _probe(name, index, dtype)


@functools.cache
def _probe(name: str, device_index: int, dtype: torch.dtype | None) -> tuple[bool, str]:
    """Import the library and run one tiny packed attention on the device: the only sure kernel check."""
    if not torch.cuda.is_available():
        return False, "CUDA is not available in this process"
    try:
        if name == "xformers":
            _xformers_ops()  # its attention operators; its compiled library is not needed
        elif name == "flash_attn":
            from flash_attn import flash_attn_varlen_func  # noqa: F401
        else:  # pragma: no cover - guarded by callers
            return False, f"unknown backend {name!r}"
    except Exception as exc:  # noqa: BLE001 - any import failure means "not installed properly"
        return False, f"{name} is not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    probe_dtype = dtype or torch.bfloat16
    if name == "flash_attn" and probe_dtype not in (torch.float16, torch.bfloat16):
        probe_dtype = torch.bfloat16
    try:
        wrong = probe_call(name, torch.device("cuda", device_index), probe_dtype)
    except Exception as exc:  # noqa: BLE001 - no kernel for this GPU/dtype/build
        return False, f"{name} has no working kernel here ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    return (False, wrong) if wrong else (True, "")


def probe_call(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """One tiny packed attention of ``name`` on ``device`` (random inputs, the result waited for); ``""`` when it
    returned the right shape with finite values, else what was wrong. Raises what the kernel raises."""
    q = torch.randn(3, 2, 64, device=device, dtype=dtype)
    kv = torch.randn(4, 1, 64, device=device, dtype=dtype)
    cu_q = torch.tensor([0, 1, 3], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 2, 4], dtype=torch.int32, device=device)
    out = packed_attention(q, kv, kv, cu_q, cu_k, 2, 2, True, name)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if out.shape != q.shape or not bool(torch.isfinite(out).all()):
        return f"{name} returned a wrong result (shape {tuple(out.shape)} for {tuple(q.shape)})"
    return ""


@functools.cache
def _xformers_ops():  # noqa: ANN202 - the module xformers.ops
    """``xformers.ops``, imported once; where its compiled library did not load, an info line says so and what it
    means (this package's ``__init__`` drops xformers' own, misleading warning)."""
    import xformers
    import xformers.ops

    if not getattr(xformers, "_has_cpp_library", False):
        log.info("xformers: its compiled library is not loaded; its attention does not use it",
                 extra={"why": _library_missing(xformers)})
    return xformers.ops


def xformers_library() -> tuple[bool, str]:
    """Whether xformers' compiled library loaded: ``(True, version)``, else ``(False, reason)`` naming the torch
    build it was made for. For ``echo4o doctor``: in xformers 0.0.35 the library holds no attention operator
    (see the note above ``XFORMERS_PAIRING``), so the engine does not need it."""
    try:
        _xformers_ops()
    except Exception as exc:  # noqa: BLE001 - any import failure means "not installed properly"
        return False, (f"xformers is not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                       f"{_INSTALL_HINT['xformers']}")
    import xformers

    if getattr(xformers, "_has_cpp_library", False):
        return True, str(getattr(xformers, "__version__", "?"))
    return False, _library_missing(xformers)


def _library_missing(xformers) -> str:  # noqa: ANN001 - the xformers module
    """Why xformers' compiled library is not loaded, and what that means."""
    built = _xformers_build()
    return (
        f"xformers {getattr(xformers, '__version__', '?')}'s compiled library does not load beside torch "
        f"{torch.__version__} (CUDA {torch.version.cuda or 'none'}); it was built for torch "
        f"{built.get('torch', '?')} with CUDA {built.get('cuda', '?')} and needs libcudart.so.12. It holds "
        f"2:4-sparsity and attention-merge operators only: xformers' attention does not use it"
    )


def _xformers_build() -> dict[str, str]:
    """The torch and CUDA versions the installed xformers wheel was compiled for (its cpp_lib.json)."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.find_spec("xformers")
    try:
        meta = json.loads((Path(spec.origin).parent / "cpp_lib.json").read_text())["version"]
    except Exception:  # noqa: BLE001 - an unusual build: say nothing rather than guess
        return {}
    cuda = meta.get("cuda")
    cuda_txt = f"{cuda // 100}.{cuda % 100}" if isinstance(cuda, int) else str(cuda)  # 1208: 12.8
    return {"torch": str(meta.get("torch")), "cuda": cuda_txt}


def xformers_operator(device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16) -> str:
    """Name of the operator xformers' dispatcher picks for the engine's packed attention on ``device``
    (``cutlassF-pt`` or ``fa2F@...-pt``: PyTorch's kernels; ``fa2F@2.x``: flash_attn's; ``fa3F@...``:
    flash_attn_3's); ``""`` when it cannot say. For the log of the chosen backend and ``echo4o doctor``."""
    try:
        _xformers_ops()
        from xformers.ops.fmha import Inputs
        from xformers.ops.fmha.dispatch import _dispatch_fw

        dev = torch.device(device)
        q = torch.zeros(1, 3, 4, 7, 128, device=dev, dtype=dtype)
        kv = torch.zeros(1, 4, 4, 1, 128, device=dev, dtype=dtype).expand(1, 4, 4, 7, 128)
        bias = xformers_bias(torch.tensor([0, 1, 3]), torch.tensor([0, 2, 4]), True, dev)
        return _dispatch_fw(Inputs(query=q, key=kv, value=kv, attn_bias=bias), False).NAME
    except Exception:  # noqa: BLE001 - private API of xformers: best effort only
        return ""


# ---------------------------------------------------------------------------------------------------
# packed attention
# ---------------------------------------------------------------------------------------------------


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    backend: str,
) -> torch.Tensor:
    """Attention of each packed query sequence over its own packed key sequence (see the module doc)."""
    _check_shapes(q, k, v, cu_seqlens_q, cu_seqlens_k)
    if backend == "sdpa":
        return _sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, causal)
    if backend == "xformers":
        return _xformers(q, k, v, cu_seqlens_q, cu_seqlens_k, causal)
    if backend == "flash_attn":
        return _flash_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)
    raise ValueError(f"attention backend {backend!r} is not one of {', '.join(BACKENDS)}; call resolve_backend()")


def _check_shapes(q, k, v, cu_q, cu_k) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be (tokens, heads, dim); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if cu_q.numel() != cu_k.numel() or cu_q.numel() < 2:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k need the same length >= 2; got {cu_q.numel()} and "
                         f"{cu_k.numel()}")


def block_mask(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean ``(total_q, total_k)`` mask, True where a query may attend a key (block diagonal; with
    ``causal``, lower-triangular inside each block, aligned to the block's bottom-right corner)."""
    device = cu_seqlens_q.device
    cu_q = cu_seqlens_q.to(torch.long)
    cu_k = cu_seqlens_k.to(torch.long)
    len_q = cu_q[1:] - cu_q[:-1]
    len_k = cu_k[1:] - cu_k[:-1]
    nseq = len_q.numel()
    seq_of_q = torch.repeat_interleave(torch.arange(nseq, device=device), len_q)
    seq_of_k = torch.repeat_interleave(torch.arange(nseq, device=device), len_k)
    mask = seq_of_q[:, None] == seq_of_k[None, :]
    if causal:
        pos_q = torch.arange(seq_of_q.numel(), device=device) - cu_q[:-1][seq_of_q]
        pos_k = torch.arange(seq_of_k.numel(), device=device) - cu_k[:-1][seq_of_k]
        limit = pos_q + (len_k - len_q)[seq_of_q]  # last key index each query may see
        mask &= pos_k[None, :] <= limit[:, None]
    return mask


def _sdpa_one(q, k, v, attn_mask=None, is_causal=False) -> torch.Tensor:
    """q ``(Tq, Hq, D)``, k/v ``(Tk, Hkv, D)`` -> ``(Tq, Hq, D)`` via one SDPA call over all heads.

    The tensors go in as ``(1, heads, tokens, D)`` views: torch's fused kernels (the CPU flash kernel
    included) take only 4-D inputs, and 3-D ones fall back to the math kernel, which materialises the whole
    score matrix (about 5x slower on CPU for an image-sized sequence). ``enable_gqa`` lets query head ``h``
    read KV head ``h // (Hq // Hkv)`` without a repeated copy of K/V (the CPU flash kernel supports it).
    """
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    groups = q.shape[1] // k.shape[1]
    gqa = groups > 1
    if gqa and attn_mask is not None and q.is_cuda:
        # CUDA's masked (memory-efficient) kernel takes no GQA: repeat K/V rather than fall back to the
        # math kernel, which would materialise the whole score matrix
        kh, vh = kh.repeat_interleave(groups, dim=1), vh.repeat_interleave(groups, dim=1)
        gqa = False
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, is_causal=is_causal,
                                         scale=1.0 / math.sqrt(q.shape[-1]), enable_gqa=gqa)
    return out[0].transpose(0, 1)


def _sdpa(q, k, v, cu_q, cu_k, causal: bool) -> torch.Tensor:
    bounds_q = cu_q.tolist()
    bounds_k = cu_k.tolist()
    lens = [(bounds_q[i + 1] - bounds_q[i], bounds_k[i + 1] - bounds_k[i]) for i in range(len(bounds_q) - 1)]
    total_q, total_k = bounds_q[-1], bounds_k[-1]
    if total_q != q.shape[0] or total_k != k.shape[0]:
        raise ValueError(f"cu_seqlens end at ({total_q}, {total_k}) but q/k hold ({q.shape[0]}, {k.shape[0]}) tokens")

    def one(i: int) -> torch.Tensor:
        lq, lk = lens[i]
        qi = q[bounds_q[i]:bounds_q[i + 1]]
        ki, vi = k[bounds_k[i]:bounds_k[i + 1]], v[bounds_k[i]:bounds_k[i + 1]]
        if lq == 0:
            return qi
        if lk == 0 or (causal and lk < lq):
            # some queries see no key at all: SDPA would give NaN there, flash-attn gives zeros
            mask = block_mask(torch.tensor([0, lq]), torch.tensor([0, lk]), True).to(q.device)
            if lk == 0:
                return torch.zeros_like(qi)
            out = _sdpa_one(qi, ki, vi, attn_mask=mask)
            return out.masked_fill(~mask.any(dim=1)[:, None, None], 0.0)
        if not causal or lq == 1:  # a single query sees every key of its sequence when bottom-right aligned
            return _sdpa_one(qi, ki, vi)
        if lq == lk:
            return _sdpa_one(qi, ki, vi, is_causal=True)
        mask = block_mask(torch.tensor([0, lq]), torch.tensor([0, lk]), True).to(q.device)
        return _sdpa_one(qi, ki, vi, attn_mask=mask)

    if len(lens) == 1:
        return one(0)
    if total_q * total_k <= _SDPA_BLOCK_MASK_MAX_CELLS:
        # many short sequences: one call with a block-diagonal mask beats a Python loop
        mask, empty = _cached_block_mask(tuple(bounds_q), tuple(bounds_k), causal, q.device)
        out = _sdpa_one(q, k, v, attn_mask=mask)
        if empty is not None:
            out = out.masked_fill(empty[:, None, None], 0.0)
        return out
    return torch.cat([one(i) for i in range(len(lens))], dim=0)


@functools.lru_cache(maxsize=4)  # at most 4 x 64 MiB
def _cached_block_mask(bounds_q: tuple[int, ...], bounds_k: tuple[int, ...], causal: bool,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The block mask (and its rows that see no key, or None) for these lengths: every layer of every
    denoising step packs the same lengths, so it is built once."""
    mask = block_mask(torch.tensor(bounds_q, device=device), torch.tensor(bounds_k, device=device), causal)
    empty = ~mask.any(dim=1)
    return mask, (empty if bool(empty.any()) else None)


@functools.lru_cache(maxsize=64)
def _xformers_bias(lens_q: tuple[int, ...], lens_k: tuple[int, ...], causal: bool, device: torch.device):
    attn_bias = _xformers_ops().fmha.attn_bias

    cls = attn_bias.BlockDiagonalCausalFromBottomRightMask if causal else attn_bias.BlockDiagonalMask
    return cls.from_seqlens(q_seqlen=list(lens_q), kv_seqlen=list(lens_k), device=device)


def xformers_bias(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, causal: bool,
                  device: torch.device | None = None):
    """The xformers attention bias for packed sequences, on ``device`` (default: that of ``cu_seqlens_q``),
    cached by lengths: every layer and denoising step reuse it. CPU ``cu_seqlens`` cost no device sync."""
    lens_q = tuple((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist())
    lens_k = tuple((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist())
    return _xformers_bias(lens_q, lens_k, causal, device or cu_seqlens_q.device)


def _xformers(q, k, v, cu_q, cu_k, causal: bool) -> torch.Tensor:
    xops = _xformers_ops()

    bias = xformers_bias(cu_q, cu_k, causal, q.device)
    total_q, hq, d = q.shape
    total_k, hkv, _ = k.shape
    groups = hq // hkv
    # BMGHK layout: G = KV heads, H = query heads per KV head; K/V are broadcast over H without a copy.
    q5 = q.reshape(1, total_q, hkv, groups, d)
    k5 = k.reshape(1, total_k, hkv, 1, d).expand(1, total_k, hkv, groups, d)
    v5 = v.reshape(1, total_k, hkv, 1, d).expand(1, total_k, hkv, groups, d)
    out = xops.memory_efficient_attention(q5, k5, v5, attn_bias=bias, scale=1.0 / math.sqrt(d))
    return out.reshape(total_q, hq, d)


def _flash_attn(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"flash_attn has no {q.dtype} kernel: use --dtype bfloat16, or --attention sdpa/xformers")
    return flash_attn_varlen_func(
        q, k, v,
        cu_seqlens_q=cu_q.to(q.device, torch.int32), cu_seqlens_k=cu_k.to(q.device, torch.int32),
        max_seqlen_q=int(max_q), max_seqlen_k=int(max_k),
        softmax_scale=1.0 / math.sqrt(q.shape[-1]), causal=causal,
    )
