"""Side by side: the sdpa backend with 3-D ``(heads, tokens, D)`` inputs (the old layout, which torch runs on
its math kernel) and with 4-D ``(1, heads, tokens, D)`` inputs (the fused/flash kernel), in one process.

    python benchmarks/sdpa_layout_bench.py                 # attention alone, then a tiny-model pipeline call
    python benchmarks/sdpa_layout_bench.py --no-pipeline   # attention alone

The old layout is reproduced here (``_sdpa_one_3d``) and swapped in for the timing; both are checked to give
the same numbers. Prints best-of-``--repeats`` wall times. A developer tool, not a test.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from worker.engine import attention  # noqa: E402


def _sdpa_one_3d(q, k, v, attn_mask=None, is_causal=False):
    """The previous ``_sdpa_one``: 3-D inputs (no batch dimension)."""
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    groups = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, is_causal=is_causal,
                                         scale=1.0 / math.sqrt(q.shape[-1]), enable_gqa=groups > 1)
    return out.transpose(0, 1)


@contextmanager
def layout(name: str):
    saved = attention._sdpa_one
    if name == "3-D":
        attention._sdpa_one = _sdpa_one_3d
    try:
        yield
    finally:
        attention._sdpa_one = saved


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def attention_cases(repeats: int) -> None:
    # (label, lens_q, lens_k, Hq, Hkv, D, causal): the 7B head shape (28 query / 4 KV heads, dim 128)
    cases = [
        ("image 32x32 over text+image context", [1026], [1100], 28, 4, 128, False),
        ("causal prefill, 1 sequence", [1024], [1024], 28, 4, 128, True),
        ("3 CFG branches packed (block mask)", [258, 258, 258], [300, 280, 270], 28, 4, 128, False),
        ("tiny model heads (4/2, dim 16)", [1026], [1100], 4, 2, 16, False),
    ]
    g = torch.Generator().manual_seed(0)
    print(f"attention alone (best of {repeats}, threads {torch.get_num_threads()}):")
    print(f"  {'case':<40}{'3-D':>10}{'4-D':>10}{'speed-up':>10}{'max diff':>11}")
    for label, lq, lk, hq, hkv, d, causal in cases:
        q = torch.randn(sum(lq), hq, d, generator=g)
        k = torch.randn(sum(lk), hkv, d, generator=g)
        v = torch.randn(sum(lk), hkv, d, generator=g)
        cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
        cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)

        def call(q=q, k=k, v=v, cu_q=cu_q, cu_k=cu_k, lq=lq, lk=lk, causal=causal):
            return attention.packed_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), causal, "sdpa")

        results = {}
        for name in ("3-D", "4-D"):
            with layout(name):
                results[name] = (best_of(call, repeats), call())
        diff = (results["3-D"][1] - results["4-D"][1]).abs().max().item()
        t3, t4 = results["3-D"][0], results["4-D"][0]
        print(f"  {label:<40}{t3:>9.4f}s{t4:>9.4f}s{t3 / t4:>9.1f}x{diff:>11.1e}")


def pipeline_call(repeats: int, refs: int, steps: int) -> None:
    from engine_bench import references

    from echo4o.logging import setup_logging
    from worker.engine.pipeline import Echo4oPipeline
    from worker.engine.tiny import write_tiny_model

    setup_logging("WARNING")
    with tempfile.TemporaryDirectory(prefix="echo4o-sdpa-") as tmp:
        path = write_tiny_model(Path(tmp) / "tiny", seed=0)
        pipe = Echo4oPipeline.from_pretrained(str(path), device="cpu", dtype="float32", attention="sdpa",
                                              device_map=None)
        images = references(refs) or None

        def call():
            return pipe("a red panda", images=images, num_steps=steps, seed=0, height=256, width=256)

        results = {}
        for name in ("3-D", "4-D"):
            with layout(name):
                results[name] = (best_of(call, repeats), call())
    a, b = results["3-D"][1], results["4-D"][1]
    diff = max(int(np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max())
               for x, y in zip(a.images, b.images, strict=True))
    t3, t4 = results["3-D"][0], results["4-D"][0]
    print(f"tiny-model pipeline call ({refs} reference(s), {steps} schedule points, best of {repeats}):")
    print(f"  3-D {t3:.2f} s   4-D {t4:.2f} s   speed-up {t3 / t4:.1f}x   max pixel diff {diff:.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--refs", type=int, default=1, help="reference images in the pipeline call")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--no-pipeline", action="store_true", help="time attention alone")
    args = ap.parse_args(argv)
    attention_cases(args.repeats)
    if not args.no_pipeline:
        pipeline_call(max(1, args.repeats // 2), args.refs, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
