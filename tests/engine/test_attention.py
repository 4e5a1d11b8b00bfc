"""Packed attention: sdpa checked against a float64 naive reference; backend selection rules; xformers masks."""

from __future__ import annotations

import math

import pytest
import torch

from worker.engine import attention
from worker.engine.attention import backend_availability, block_mask, packed_attention, resolve_backend, select_backend


def naive_packed(q, k, v, lens_q, lens_k, causal):
    """Float64, sequence by sequence, head by head: the definition written out."""
    q, k, v = q.double(), k.double(), v.double()
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    out = torch.zeros_like(q)
    oq = ok = 0
    for lq, lk in zip(lens_q, lens_k, strict=True):
        for h in range(hq):
            kv_h = h // (hq // hkv)
            for i in range(lq):
                visible = lk if not causal else min(lk, i + lk - lq + 1)
                if visible <= 0:
                    continue  # sees no key: zeros, as flash-attn
                scores = k[ok:ok + visible, kv_h] @ q[oq + i, h] / math.sqrt(d)
                weights = torch.softmax(scores, dim=0)
                out[oq + i, h] = weights @ v[ok:ok + visible, kv_h]
        oq += lq
        ok += lk
    return out


def make_inputs(lens_q, lens_k, hq, hkv, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), hq, d, generator=g).to(dtype)
    k = torch.randn(sum(lens_k), hkv, d, generator=g).to(dtype)
    v = torch.randn(sum(lens_k), hkv, d, generator=g).to(dtype)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu_q, cu_k


CASES = [
    # (lens_q, lens_k): self-attention mixed lengths; cached decoding (1 query over a prefix); a query block
    # over a longer cache; one single sequence; more queries than keys (top rows see nothing when causal)
    ([5, 1, 7, 3], [5, 1, 7, 3]),
    ([1, 1, 1], [4, 9, 2]),
    ([3, 6], [10, 8]),
    ([11], [11]),
    ([6], [13]),
    ([4, 2], [2, 2]),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (4, 1)], ids=["mha", "gqa3", "mqa"])
@pytest.mark.parametrize("lens", CASES, ids=lambda c: f"q{c[0]}k{c[1]}" if isinstance(c, tuple) else None)
def test_sdpa_matches_float64_reference(lens, heads, causal):
    lens_q, lens_k = lens
    hq, hkv = heads
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, hq, hkv, d=16)
    out = packed_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal, "sdpa")
    ref = naive_packed(q, k, v, lens_q, lens_k, causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_sdpa_per_sequence_path_matches_block_mask_path(monkeypatch):
    """Large packs run sequence by sequence; both paths give the same numbers."""
    lens_q, lens_k = [3, 6, 1], [10, 8, 4]
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, 4, 2, d=8, seed=3)
    for causal in (False, True):
        masked = packed_attention(q, k, v, cu_q, cu_k, 6, 10, causal, "sdpa")
        monkeypatch.setattr(attention, "_SDPA_BLOCK_MASK_MAX_CELLS", 0)
        looped = packed_attention(q, k, v, cu_q, cu_k, 6, 10, causal, "sdpa")
        monkeypatch.undo()
        ref = naive_packed(q, k, v, lens_q, lens_k, causal)
        assert (masked.double() - ref).abs().max().item() < 1e-5
        assert (looped.double() - ref).abs().max().item() < 1e-5


def test_sdpa_bfloat16_stays_bfloat16_and_close():
    lens = [4, 9]
    q, k, v, cu_q, cu_k = make_inputs(lens, lens, 4, 2, d=32, dtype=torch.bfloat16)
    out = packed_attention(q, k, v, cu_q, cu_k, 9, 9, True, "sdpa")
    assert out.dtype == torch.bfloat16
    ref = naive_packed(q, k, v, lens, lens, True)
    assert (out.double() - ref).abs().max().item() < 3e-2


def test_block_mask_by_hand():
    # two sequences: q lens (2, 1), k lens (3, 2); causal aligned bottom-right
    mask = block_mask(torch.tensor([0, 2, 3]), torch.tensor([0, 3, 5]), causal=True)
    expected = torch.tensor([
        [1, 1, 0, 0, 0],   # seq 0, query 0 sees keys 0..1 (0 + 3 - 2)
        [1, 1, 1, 0, 0],   # seq 0, query 1 sees keys 0..2
        [0, 0, 0, 1, 1],   # seq 1, its single query sees both of its keys
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)
    full = block_mask(torch.tensor([0, 2, 3]), torch.tensor([0, 3, 5]), causal=False)
    assert torch.equal(full, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool))


@pytest.mark.parametrize("causal", [False, True])
def test_xformers_bias_equals_our_block_mask(causal):
    """The xformers masks (built here on CPU; only its kernels need CUDA) allow exactly our cells."""
    try:
        import xformers.ops.fmha.attn_bias  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"xformers is not importable ({exc}): pip install -e '.[gpu]' (its masks build on CPU)")
    cu_q = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 9, 14], dtype=torch.int32)
    bias = attention.xformers_bias(cu_q, cu_k, causal)
    dense = bias.materialize((9, 14))
    assert torch.equal(dense == 0, block_mask(cu_q, cu_k, causal))


def test_auto_on_cpu_is_sdpa():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("sdpa", "cpu") == "sdpa"


@pytest.mark.parametrize("name", ["xformers", "flash_attn"])
def test_explicit_backend_without_kernel_is_a_clear_error(name):
    with pytest.raises(ValueError) as err:
        resolve_backend(name, torch.device("cpu"))
    msg = str(err.value)
    assert name in msg and "--attention sdpa" in msg and "needs CUDA" in msg


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="auto, sdpa, xformers, flash_attn"):
        resolve_backend("flex", torch.device("cpu"))
    with pytest.raises(ValueError, match="resolve_backend"):
        q, k, v, cu_q, cu_k = make_inputs([2], [2], 2, 2, 4)
        packed_attention(q, k, v, cu_q, cu_k, 2, 2, False, "auto")


def test_flash_attn_rejects_float32_before_probing():
    ok, why = attention.backend_availability("flash_attn", torch.device("cuda", 0), torch.float32)
    assert not ok and "float16 or bfloat16" in why


def test_cuda_auto_order_prefers_xformers_then_flash_attn_then_sdpa():
    yes, no = (True, ""), (False, "not installed")
    assert select_backend("auto", "cuda", {"xformers": yes, "flash_attn": yes}) == "xformers"
    assert select_backend("auto", "cuda", {"xformers": no, "flash_attn": yes}) == "flash_attn"
    assert select_backend("auto", "cuda", {"xformers": no, "flash_attn": no}) == "sdpa"
    assert select_backend("auto", "cpu", {"xformers": yes, "flash_attn": yes}) == "sdpa"
    assert select_backend("flash_attn", "cuda", {"flash_attn": yes}) == "flash_attn"
    with pytest.raises(ValueError, match="not installed"):
        select_backend("xformers", "cuda", {"xformers": no})


def test_bad_shapes_are_named():
    q, k, v, cu_q, cu_k = make_inputs([3], [3], 3, 2, 4)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        packed_attention(q, k, v, cu_q, cu_k, 3, 3, False, "sdpa")
    q, k, v, cu_q, cu_k = make_inputs([3], [3], 2, 2, 4)
    with pytest.raises(ValueError, match="cu_seqlens end"):
        packed_attention(q, k, v, torch.tensor([0, 2], dtype=torch.int32), cu_k, 3, 3, False, "sdpa")


# --- GPU kernels: run where CUDA is present ---------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["xformers", "flash_attn"])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_backend_matches_reference(name, causal):
    device = torch.device("cuda")
    ok, why = attention.backend_availability(name, device, torch.bfloat16)
    if name == "flash_attn" and not ok:
        # optional (built against the local CUDA toolkit): without it the backend must say why, not run
        assert why, "flash_attn unavailable without a reason"
        return
    assert ok, why  # xformers comes with the gpu extra: on a CUDA machine its kernels must load
    for lens_q, lens_k in CASES[:4]:
        q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, 8, 2, d=64, dtype=torch.bfloat16)
        out = packed_attention(q.cuda(), k.cuda(), v.cuda(), cu_q.cuda(), cu_k.cuda(), max(lens_q), max(lens_k),
                               causal, name)
        ref = naive_packed(q, k, v, lens_q, lens_k, causal)
        assert (out.cpu().double() - ref).abs().max().item() < 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_sdpa_matches_reference(causal):
    for lens_q, lens_k in CASES:
        q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, 8, 2, d=64)
        out = packed_attention(q.cuda(), k.cuda(), v.cuda(), cu_q.cuda(), cu_k.cuda(), max(lens_q), max(lens_k),
                               causal, "sdpa")
        ref = naive_packed(q, k, v, lens_q, lens_k, causal)
        assert (out.cpu().double() - ref).abs().max().item() < 1e-3


# --- xformers must really run: a packed attention through its dispatcher, on the card -----------------------


def test_xformers_is_refused_on_the_cpu_naming_cuda_and_the_fix():
    """This machine has xformers 0.0.35 (gpu extra) beside a CPU build of torch: none of its attention operators
    has a CPU kernel. Asked for explicitly, it is refused naming why and the fix."""
    ok, why = backend_availability("xformers", torch.device("cpu"))
    assert not ok and "needs CUDA" in why
    with pytest.raises(ValueError) as err:
        resolve_backend("xformers", torch.device("cpu"))
    message = str(err.value)
    assert "needs CUDA" in message and "--attention sdpa" in message
    assert "install xformers beside a CUDA build of torch" in message and "xformers==0.0.35" in message


def test_xformers_compiled_library_is_reported_with_the_build_it_wants():
    """Its compiled library (2:4 sparsity, attention merging) was built for torch 2.10.0 + CUDA 12.8 and does not
    load beside this CPU torch; the report names that build and that xformers' attention does not use it."""
    ok, why = attention.xformers_library()
    assert not ok
    assert "compiled library does not load beside torch" in why and "2.10.0+cu128" in why and "CUDA 12.8" in why
    assert "libcudart.so.12" in why and "attention does not use it" in why


def test_xformers_probe_needs_no_compiled_library(monkeypatch):
    """On a CUDA machine the probe imports xformers' operators and runs one packed attention through them;
    whether the compiled library loaded is not asked (it holds no attention operator). No CUDA here: the probe
    runs with the CUDA check passed and its attention call recorded instead of run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention, "xformers_library", lambda: pytest.fail("the probe asked for the library"))
    calls = []
    monkeypatch.setattr(attention, "probe_call", lambda name, device, dtype: calls.append((name, device, dtype)))
    attention._probe.cache_clear()
    try:
        assert attention._probe("xformers", 0, torch.bfloat16) == (True, "")
    finally:
        attention._probe.cache_clear()
    assert calls == [("xformers", torch.device("cuda", 0), torch.bfloat16)]


def test_auto_on_cuda_logs_why_it_fell_back(monkeypatch, caplog):
    """The selection on a CUDA machine where xformers' probe failed (a card its operators do not support) and
    flash_attn is not installed; no CUDA here, so the probes are replaced by their answers."""
    no_operator = ("xformers has no working kernel here (NotImplementedError: No operator found for "
                   "`memory_efficient_attention_forward`)")
    answers = {"xformers": (False, no_operator),
               "flash_attn": (False, "flash_attn is not importable (ModuleNotFoundError)"), "sdpa": (True, "")}
    monkeypatch.setattr(attention, "backend_availability", lambda name, device, dtype=None: answers[name])
    with caplog.at_level("WARNING", logger="worker.engine.attention"):
        assert resolve_backend("auto", torch.device("cuda")) == "sdpa"
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "fell back past xformers, flash_attn to sdpa" in warnings[0].getMessage()
    assert warnings[0].why == {"xformers": no_operator, "flash_attn": answers["flash_attn"][1]}
    with pytest.raises(ValueError, match="No operator found"):
        resolve_backend("xformers", torch.device("cuda"))


@pytest.mark.gpu
def test_gpu_xformers_runs_and_names_the_operator_it_dispatches_to():
    """On a card the probe runs a packed attention through xformers, and its dispatcher names the operator it
    picked (cutlassF-pt or fa2F@...-pt: PyTorch's kernels; fa2F@2.x: flash_attn; fa3F: flash_attn_3)."""
    ok, why = backend_availability("xformers", torch.device("cuda"), torch.bfloat16)
    assert ok, why
    assert attention.xformers_operator("cuda"), "xformers' dispatcher picked no operator"


def test_xformers_import_warning_about_its_library_is_replaced_by_an_accurate_line():
    """Imported on its own, xformers 0.0.35 warns beside this torch that memory-efficient attention "won't be
    available" (its library did not load): not so. Through the engine, in a fresh process, that warning is
    dropped (whoever imports xformers first) and one info line says what is true; a plain import still warns
    (the check that it would)."""
    import subprocess
    import sys

    def stderr_of(code: str) -> str:
        return subprocess.run([sys.executable, "-c", "import logging; logging.basicConfig(level=logging.INFO)\n"
                               + code], capture_output=True, text=True, timeout=120, check=True).stderr

    plain = stderr_of("import xformers.ops")
    assert "can't load C++/CUDA extensions" in plain
    # diffusers (the VAE's) imports xformers at its own import, before the engine's attention does
    engine = stderr_of("from worker.engine.models import vae\nfrom worker.engine import attention\n"
                       "attention.xformers_library()\n"
                       "attention.xformers_bias(*[__import__('torch').tensor([0, 2])] * 2, True)")
    assert "can't load C++/CUDA extensions" not in engine, engine
    assert engine.count("its compiled library is not loaded; its attention does not use it") == 1, engine
