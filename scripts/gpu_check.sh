#!/usr/bin/env bash
# One prepared GPU check: environment, `echo4o doctor`, the gpu-marked tests and the full-size random-weight
# engine benchmark (attention backends, step caching on/off, memory modes), every figure in one JSON file
# ($OUT/gpu_check.json when OUT is set, else gpu_check_out/gpu_check.json), within GPU_CHECK_BUDGET_S seconds
# (default 470: under 8 minutes). Each step is time-boxed with `timeout` and skipped when the budget left is
# too small; a failing step is recorded, never fatal.
#
#   scripts/gpu_check.sh                 # on a CUDA machine
#   GPU_CHECK_DRY=1 scripts/gpu_check.sh # print the plan and exit 0 (anywhere; CI runs this)
#   scripts/gpu_check.sh --fetch-wheels  # on a networked machine: put the wheels the GPU machine lacks in .whl/
#
# The GPU machine may be offline. Python packages it lacks travel as wheels in .whl/ (git-ignored; made by
# --fetch-wheels for Python 3.12): they are installed into /tmp/site with --no-index. When the network is
# reachable (GPU_CHECK_INSTALL=1), the xformers pairing is installed instead: torch==2.13.0 from the PyTorch
# cu128 index with xformers==0.0.35 (README, "GPU install"). With a CUDA 13 torch, xformers' CUDA 12.8 library
# needs libcudart.so.12: the nvidia-cuda-runtime-cu12 wheel in .whl/ provides it (LD_LIBRARY_PATH).
#
# Settings (environment): GPU_CHECK_PYTHON (default: .venv/bin/python when it sees CUDA, else python3),
# GPU_CHECK_SIZE (1024), GPU_CHECK_STEPS (50), GPU_CHECK_MODE_STEPS (10: memory-mode runs, per-step figures),
# GPU_CHECK_BUDGET_S (470), GPU_CHECK_ATTENTION ("sdpa xformers flash_attn"),
# GPU_CHECK_MODES ("int8 nf4 offload nf4+offload"), GPU_CHECK_SKIP (step names to skip, e.g. "gpu_tests"); for a smoke run elsewhere GPU_CHECK_DEVICE (cuda) and
# GPU_CHECK_LAYERS (decoder layers of the full-width model; default all).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD

WHEELS="diffusers importlib_metadata pydantic pydantic-core pydantic-settings python-dotenv annotated-types
typing-inspection bitsandbytes xformers==0.0.35 nvidia-cuda-runtime-cu12==12.8.*"

if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p .whl
    # shellcheck disable=SC2086
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl $WHEELS
fi

SIZE=${GPU_CHECK_SIZE:-1024}
STEPS=${GPU_CHECK_STEPS:-50}
MODE_STEPS=${GPU_CHECK_MODE_STEPS:-10}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
ATTENTIONS=${GPU_CHECK_ATTENTION:-sdpa xformers flash_attn}
MODES=${GPU_CHECK_MODES:-int8 nf4 offload nf4+offload}
OUT_DIR=${OUT:-$ROOT/gpu_check_out}
JSON=$OUT_DIR/gpu_check.json
LOG=$OUT_DIR/gpu_check.log
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
START=$(date +%s)
DEVICE=${GPU_CHECK_DEVICE:-cuda}
BENCH=(benchmarks/engine_bench.py --model full --device "$DEVICE" --dtype bfloat16 --size "$SIZE"
       ${GPU_CHECK_LAYERS:+--layers "$GPU_CHECK_LAYERS"})

# name | time box (s) | what it runs
plan() {
    echo "setup       | 200 | wheels from .whl/ (offline) or, with GPU_CHECK_INSTALL=1, the xformers pairing"
    echo "doctor      |  90 | python -m echo4o doctor --json"
    echo "gpu_tests   | 150 | python -m pytest -m gpu tests/engine -q"
    for att in $ATTENTIONS; do
        extras="--no-extras"
        [ "$att" = sdpa ] && extras="(with step caching / guidance-batching comparisons, --batch-requests 0)"
        echo "bench_$att | 120 | ${BENCH[*]} --steps $STEPS --attention $att $extras"
    done
    for mode in $MODES; do
        echo "mode_$mode | 100 | full random model, memory mode $mode, attention sdpa, $SIZE px, $MODE_STEPS steps"
    done
    echo "(budget ${BUDGET} s in all; a step starts only with 20 s left; figures -> $JSON)"
}

if [ -n "${GPU_CHECK_DRY:-}" ]; then
    echo "gpu_check plan (dry run: nothing is executed)"
    plan
    rmdir "$WORK"
    exit 0
fi

mkdir -p "$OUT_DIR"
: > "$LOG"
: > "$WORK/steps.jsonl"

pick_python() {
    if [ -n "${GPU_CHECK_PYTHON:-}" ]; then echo "$GPU_CHECK_PYTHON"; return; fi
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch,sys; sys.exit(not torch.cuda.is_available())" \
        2>/dev/null; then echo "$ROOT/.venv/bin/python"; return; fi
    echo python3
}
PY=$(pick_python)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PY SIZE MODE_STEPS DEVICE ROOT

# run_step NAME TIMEBOX COMMAND...: time-boxed, logged, recorded in steps.jsonl
run_step() {
    local name=$1 box=$2; shift 2
    local now left rc t0 t1
    now=$(date +%s); left=$((BUDGET - (now - START)))
    if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
        printf '{"step": "%s", "status": "skipped", "why": "GPU_CHECK_SKIP"}\n' "$name" >> "$WORK/steps.jsonl"
        echo "== $name: skipped (GPU_CHECK_SKIP)" | tee -a "$LOG"
        return 0
    fi
    if [ "$left" -lt 20 ]; then
        printf '{"step": "%s", "status": "skipped", "why": "time budget spent"}\n' "$name" >> "$WORK/steps.jsonl"
        echo "== $name: skipped (budget)" | tee -a "$LOG"
        return 0
    fi
    [ "$box" -gt "$left" ] && box=$left
    echo "== $name (time box ${box} s): $*" | tee -a "$LOG"
    t0=$(date +%s.%N)
    timeout -k 5 "$box" bash -c '"$@"' "$name" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    cat "$WORK/$name.log" >> "$LOG"
    "$PY" - "$name" "$rc" "$t0" "$t1" "$WORK/$name.log" >> "$WORK/steps.jsonl" <<'EOF'
import json, sys
name, rc, t0, t1, log = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
tail = open(log, errors="replace").read()[-1500:]
status = "ok" if rc == 0 else ("timeout" if rc in (124, 137) else "failed")
print(json.dumps({"step": name, "status": status, "rc": rc, "wall_s": round(t1 - t0, 1), "tail": tail}))
EOF
    echo "== $name: rc=$rc" | tee -a "$LOG"
}

setup_env() {
    if [ "${GPU_CHECK_INSTALL:-0}" = 1 ]; then
        "$PY" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu128 &&
            "$PY" -m pip install -q "xformers==0.0.35" "bitsandbytes>=0.45" diffusers pydantic-settings
        return
    fi
    if compgen -G ".whl/*.whl" > /dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || return
    fi
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
}

mode_bench() {  # mode_bench MODE JSON: the full random model in a memory mode (engine_bench has no such flag)
    "$PY" - "$1" "$2" "$SIZE" "$MODE_STEPS" "$DEVICE" "${GPU_CHECK_LAYERS:-}" <<'EOF'
import json, sys, tempfile, time
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
import engine_bench as eb  # noqa: E402

from worker.engine.memory import apply_memory_mode, expected_memory, measure_memory  # noqa: E402

mode, out, size, steps, device, layers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:7]
args = eb.parse_args(["--model", "full", "--device", device, "--dtype", "bfloat16", "--size", size,
                      "--steps", str(steps), "--attention", "sdpa", *(["--layers", layers] if layers else [])])
cuda = device.startswith("cuda")
with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    pipe = eb.build_full_random(args, Path(tmp))
    pipe.model, pipe.vae = apply_memory_mode(pipe.model, pipe.vae, mode, pipe.device, pipe.dtype)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    load_s = time.perf_counter() - t0
    side = eb.parse_size(size)
    eb.timed_call(pipe, args, [], side, 2, pipe.device)  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run = eb.timed_call(pipe, args, [], side, steps, pipe.device)
    steps_done = max(1, len(run["step_times"]))
    result = {
        "memory_mode": mode, "size": size, "steps": steps - 1, "load_s": round(load_s, 2),
        "step_s": round(sum(run["step_times"]) / steps_done, 4), "image_s": round(run["total_s"], 3),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "weights_device_gib_measured": round(measure_memory(pipe.model, pipe.vae, mode).device_bytes / 2**30, 3),
        "weights_device_gib_expected": round(expected_memory(pipe.config, mode, pipe.dtype).device_bytes / 2**30, 3),
        "weights_host_gib": round(measure_memory(pipe.model, pipe.vae, mode).host_bytes / 2**30, 3),
    }
Path(out).write_text(json.dumps(result, indent=2))
print(json.dumps(result))
EOF
}

export -f setup_env mode_bench
echo "gpu_check: python $PY, budget ${BUDGET} s, output $JSON" | tee -a "$LOG"
run_step setup 200 setup_env
if [ -d /tmp/site ]; then
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
    [ -d /tmp/site/nvidia/cuda_runtime/lib ] &&
        export LD_LIBRARY_PATH="/tmp/site/nvidia/cuda_runtime/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
run_step doctor 90 bash -c "'$PY' -m echo4o doctor --json > '$WORK/doctor.json'"
run_step gpu_tests 150 "$PY" -m pytest -m gpu tests/engine -q -p no:randomly -p no:cacheprovider -x
# engine_bench's optional flags, used only where this version has them
BENCH_HELP=$("$PY" benchmarks/engine_bench.py --help 2>/dev/null)
NO_EXTRAS=(); ONE_REQUEST=()
grep -q -- "--no-extras" <<< "$BENCH_HELP" && NO_EXTRAS=(--no-extras)
grep -q -- "--batch-requests" <<< "$BENCH_HELP" && ONE_REQUEST=(--batch-requests 0)
for att in $ATTENTIONS; do
    if [ "$att" = sdpa ]; then
        run_step "bench_$att" 120 "$PY" "${BENCH[@]}" --steps "$STEPS" --attention "$att" "${ONE_REQUEST[@]}" \
            --json "$WORK/bench_$att.json"
    else
        run_step "bench_$att" 120 "$PY" "${BENCH[@]}" --steps "$STEPS" --attention "$att" "${NO_EXTRAS[@]}" \
            --json "$WORK/bench_$att.json"
    fi
done
for mode in $MODES; do
    run_step "mode_$mode" 100 mode_bench "$mode" "$WORK/mode_${mode//+/_}.json"
done

"$PY" - "$WORK" "$JSON" "$START" <<'EOF'
import json, sys, time
from pathlib import Path

work, out, start = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines() if line.strip()]
def load(p):
    try:
        return json.loads(p.read_text())
    except Exception:  # noqa: BLE001 - a step that failed left no file
        return None
result = {
    "total_s": round(time.time() - start, 1),
    "steps": steps,
    "doctor": load(work / "doctor.json"),
    "bench": {p.stem.removeprefix("bench_"): load(p) for p in sorted(work.glob("bench_*.json"))},
    "memory_modes": {p.stem.removeprefix("mode_").replace("_", "+"): load(p) for p in sorted(work.glob("mode_*.json"))},
}
out.write_text(json.dumps(result, indent=2) + "\n")
print(f"gpu_check: wrote {out} ({result['total_s']} s); steps: "
      + ", ".join(f"{s['step']}={s['status']}" for s in steps))
EOF
rm -rf "$WORK"
exit 0
