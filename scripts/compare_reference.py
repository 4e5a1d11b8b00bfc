#!/usr/bin/env python
"""Run the public reference BAGEL and our engine on the same tiny checkpoint, seed and inputs; print how far
apart the final latents are (text-to-image and multi-reference). A developer tool, not a test.

    python scripts/compare_reference.py                       # tiny checkpoint written by the reference side
    python scripts/compare_reference.py --checkpoint ours     # ... or by `echo4o make-tiny`
    python scripts/compare_reference.py --checkpoint DIR --cases t2i --steps 12 --keep /tmp/cmp

The reference runs in a subprocess through ../shared/reference_check/run_ref.py (its own pinned transformers
in a private site folder, CPU, float32; never imported from here). It needs ``BAGEL_GIT_DIR``, a git directory
of ByteDance-Seed/Bagel (default: /work/.mirror/ByteDance-Seed+Bagel/repo when present); ``BAGEL_REF_SITE``
and ``BAGEL_SRC_DIR`` are passed through when set (see reference_check/README.md). Our side runs in this
process: ``Echo4oPipeline.from_pretrained(..., device="cpu", dtype="float32", attention="sdpa")`` with
``output_type="latent"``. Both use ``--threads`` CPU threads. Exit status 1 when a case is over ``--tol``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REF_DIR = ROOT.parent / "shared" / "reference_check"
DEFAULT_GIT_DIR = Path("/work/.mirror/ByteDance-Seed+Bagel/repo")

# (name, kwargs): the same parameters go to both sides
CASES = {
    "t2i": dict(prompt="a red panda on a bed", seed=42, steps=12, height=128, width=128, cfg_text_scale=4.0,
                cfg_img_scale=1.5, cfg_interval=(0.4, 1.0), timestep_shift=3.0, cfg_renorm_type="global",
                cfg_renorm_min=0.0, refs=0),
    "multiref": dict(prompt="put the panda from the first image on the bed from the second image", seed=7, steps=8,
                     height=None, width=None, cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0),
                     timestep_shift=3.0, cfg_renorm_type="text_channel", cfg_renorm_min=0.0, refs=2),
}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="ref",
                    help="ref: write one with reference_check/make_tiny.py; ours: with echo4o make-tiny; or a folder")
    ap.add_argument("--tokenizer", choices=["bpe", "qwen"], default="bpe",
                    help="tokenizer of a make_tiny.py checkpoint (qwen: real Qwen2 files, vocab 152064)")
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    ap.add_argument("--steps", type=int, default=None, help="override every case's schedule points")
    ap.add_argument("--ref", type=Path, action="append", default=[],
                    help="reference image for the multiref case (repeat); default: two synthetic images")
    ap.add_argument("--ref-dir", type=Path, default=DEFAULT_REF_DIR, help="the reference_check folder")
    ap.add_argument("--ref-python", default=sys.executable, help="python that runs run_ref.py")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tol", type=float, default=1e-4, help="max abs latent difference allowed")
    ap.add_argument("--keep", type=Path, default=None, help="keep the outputs (both sides) in this folder")
    ap.add_argument("--dump-trajectory", action="store_true", help="ask run_ref.py for per-step x_t / v_t too")
    return ap.parse_args()


def ref_env() -> dict[str, str]:
    env = dict(os.environ)
    if "BAGEL_GIT_DIR" not in env:
        if not DEFAULT_GIT_DIR.exists():
            raise SystemExit("BAGEL_GIT_DIR is not set and /work/.mirror/ByteDance-Seed+Bagel/repo is missing: "
                             "point BAGEL_GIT_DIR at a git directory of ByteDance-Seed/Bagel")
        env["BAGEL_GIT_DIR"] = str(DEFAULT_GIT_DIR)
    return env


def run_logged(cmd: list[str], env: dict[str, str] | None, what: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - t0


def make_checkpoint(args: argparse.Namespace, work: Path) -> Path:
    if args.checkpoint not in ("ref", "ours"):
        path = Path(args.checkpoint)
        if not (path / "llm_config.json").is_file():
            raise SystemExit(f"{path} is not a checkpoint folder (no llm_config.json)")
        return path
    out = work / f"tiny-{args.checkpoint}"
    if args.checkpoint == "ref":
        cmd = [args.ref_python, str(args.ref_dir / "make_tiny.py"), str(out), "--seed", "0", "--tokenizer",
               args.tokenizer]
        seconds = run_logged(cmd, ref_env(), "reference make_tiny.py")
    else:
        cmd = [sys.executable, "-m", "echo4o", "make-tiny", str(out), "--seed", "0"]
        seconds = run_logged(cmd, None, "echo4o make-tiny")
    writer = "reference_check/make_tiny.py" if args.checkpoint == "ref" else "echo4o make-tiny"
    print(f"checkpoint: {out} (written by {writer}, {seconds:.0f}s)")
    return out


def synthetic_refs(work: Path) -> list[Path]:
    """Two small images of different sizes and content (the second is an RGBA PNG with transparency)."""
    from PIL import Image, ImageDraw

    a = Image.linear_gradient("L").resize((200, 150)).convert("RGB")
    ImageDraw.Draw(a).ellipse((40, 30, 140, 120), fill=(220, 90, 30))
    b = Image.new("RGBA", (120, 168), (30, 60, 200, 255))
    ImageDraw.Draw(b).rectangle((10, 20, 90, 100), fill=(250, 250, 0, 90))
    paths = [work / "ref_a.png", work / "ref_b.png"]
    a.save(paths[0])
    b.save(paths[1])
    return paths


def run_reference(args: argparse.Namespace, model: Path, case: dict, refs: list[Path], prefix: Path) -> float:
    cmd = [args.ref_python, str(args.ref_dir / "run_ref.py"), "--model", str(model), "--prompt", case["prompt"],
           "--seed", str(case["seed"]), "--steps", str(case["steps"]),
           "--cfg-text-scale", str(case["cfg_text_scale"]), "--cfg-img-scale", str(case["cfg_img_scale"]),
           "--cfg-interval", str(case["cfg_interval"][0]), str(case["cfg_interval"][1]),
           "--timestep-shift", str(case["timestep_shift"]), "--cfg-renorm-type", case["cfg_renorm_type"],
           "--cfg-renorm-min", str(case["cfg_renorm_min"]), "--threads", str(args.threads),
           "--out-prefix", str(prefix)]
    if case["height"]:
        cmd += ["--height", str(case["height"]), "--width", str(case["width"])]
    for path in refs:
        cmd += ["--ref", str(path)]
    if args.dump_trajectory:
        cmd.append("--dump-trajectory")
    return run_logged(cmd, ref_env(), "reference run_ref.py")


def run_ours(pipe, case: dict, refs: list[Path]):
    from PIL import Image

    images = [Image.open(p) for p in refs]
    t0 = time.perf_counter()
    out = pipe(case["prompt"], images=images or None, height=case["height"], width=case["width"],
               num_steps=case["steps"], cfg_text_scale=case["cfg_text_scale"], cfg_img_scale=case["cfg_img_scale"],
               cfg_interval=case["cfg_interval"], timestep_shift=case["timestep_shift"],
               cfg_renorm_type=case["cfg_renorm_type"], cfg_renorm_min=case["cfg_renorm_min"], seed=case["seed"],
               output_type="latent")
    return out.images[0].numpy(), out.params, time.perf_counter() - t0


def main() -> int:
    args = parse_args()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="echo4o-cmp-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = make_checkpoint(args, work)
        refs = args.ref or synthetic_refs(work)

        from worker.engine.pipeline import Echo4oPipeline

        pipe = Echo4oPipeline.from_pretrained(str(model), device="cpu", dtype="float32", attention="sdpa",
                                              device_map=None)
        failed = False
        for name in args.cases:
            case = dict(CASES[name])
            if args.steps:
                case["steps"] = args.steps
            case_refs = (args.ref or refs[: case["refs"]]) if case["refs"] else []
            prefix = work / name
            ref_s = run_reference(args, model, case, case_refs, prefix)
            theirs = np.load(f"{prefix}.latents.npy")
            ours, params, our_s = run_ours(pipe, case, case_refs)
            if ours.shape != theirs.shape:
                print(f"{name}: SHAPE MISMATCH ours {ours.shape} vs reference {theirs.shape}")
                failed = True
                continue
            diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
            ok = bool(diff.max() <= args.tol)
            failed |= not ok
            print(f"{name}: {'OK  ' if ok else 'FAIL'} max |ours - ref| = {diff.max():.3e}, mean {diff.mean():.3e} "
                  f"(tol {args.tol:g}); latents {tuple(ours.shape)}, {params['width']}x{params['height']}, "
                  f"{case['steps'] - 1} steps, {len(case_refs)} ref(s); reference {ref_s:.0f}s, ours {our_s:.1f}s")
            if args.keep:
                np.save(work / f"{name}.ours.latents.npy", ours)
                (work / f"{name}.ours.json").write_text(json.dumps(params, indent=2, default=str))
            if not ok:
                worst = np.unravel_index(diff.argmax(), diff.shape)
                print(f"  worst at token {worst[0]}, feature {worst[1]}: ours {ours[worst]:.6f}, ref "
                      f"{theirs[worst]:.6f}; reference record: {prefix}.json"
                      f"{'' if args.keep else ' (use --keep DIR to keep it)'}")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
