"""``echo4o doctor``: what this machine can run, measured rather than assumed.

Prints torch and CUDA, each device with its free/total memory, each attention backend after a tiny real call
(``OK`` or the reason it does not run), the memory modes whose libraries import, and the free RAM. Always
exits 0: it reports, it does not judge. ``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import json
import platform

import typer

from echo4o.cli import app

GIB = 2**30


def _gib(n: int | float) -> str:
    return f"{n / GIB:.1f} GiB"


def collect() -> dict:
    """Every figure ``echo4o doctor`` prints, as plain data."""
    import psutil
    import torch

    from worker.engine import attention
    from worker.engine.memory import available_modes

    info: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "devices": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            props = torch.cuda.get_device_properties(i)
            info["devices"].append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                                    "free_bytes": free, "total_bytes": total})
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = {}
    for name in attention.BACKENDS:
        ok, why = _try_backend(attention, name, device, dtype)
        entry = {"ok": ok, "reason": why}
        if name == "xformers":
            lib_ok, lib = attention.xformers_library()  # sparsity and merge operators only: not needed to run
            entry["library"] = {"loaded": lib_ok, "detail": lib}
            if ok:
                entry["operator"] = attention.xformers_operator(device, dtype)
        backends[name] = entry
    info["attention"] = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "backends": backends}
    info["memory_modes"] = {name: {"ok": ok, "detail": why} for name, (ok, why) in available_modes().items()}
    vm = psutil.virtual_memory()
    info["ram"] = {"available_bytes": vm.available, "total_bytes": vm.total}
    return info


def _try_backend(attention, name: str, device, dtype) -> tuple[bool, str]:
    """Availability as the engine decides it, then one tiny packed attention call: OK only if it ran."""
    ok, why = attention.backend_availability(name, device, dtype)
    if not ok:
        return False, why
    try:
        wrong = attention.probe_call(name, device, dtype)
    except Exception as exc:  # noqa: BLE001 - report, never crash
        return False, f"{name} failed its test call ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    return (False, wrong) if wrong else (True, "")


def render(info: dict) -> str:
    lines = [f"python {info['python']}", f"torch {info['torch']}"]
    if info["cuda_available"]:
        lines.append(f"cuda available: yes (CUDA {info['cuda_version']}, {len(info['devices'])} device(s))")
    else:
        lines.append(f"cuda available: no (torch built with CUDA {info['cuda_version'] or 'none'})")
    for d in info["devices"]:
        lines.append(f"device cuda:{d['index']}: {d['name']} (sm {d['capability']}), {_gib(d['free_bytes'])} free "
                     f"of {_gib(d['total_bytes'])}")
    att = info["attention"]
    lines.append(f"attention (tested on {att['device']}, {att['dtype']}):")
    for name, entry in att["backends"].items():
        status = "OK" if entry["ok"] else f"not running: {entry['reason']}"
        extra = f" (operator {entry['operator']})" if entry.get("operator") else ""
        lines.append(f"  {name}: {status}{extra}")
        if "library" in entry:
            lib = entry["library"]
            lines.append(f"    compiled library: {'loaded, ' if lib['loaded'] else 'not loaded: '}{lib['detail']}")
    lines.append("memory modes:")
    for name, entry in info["memory_modes"].items():
        detail = f" ({entry['detail']})" if entry["detail"] else ""
        lines.append(f"  {name}: {'OK' if entry['ok'] else 'unavailable'}{detail}")
    ram = info["ram"]
    lines.append(f"ram: {_gib(ram['available_bytes'])} free of {_gib(ram['total_bytes'])}")
    return "\n".join(lines)


@app.command("doctor")
def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the report."),
) -> None:
    """What this machine can run: torch, CUDA, devices and their memory, attention kernels that actually run,
    memory modes, free RAM."""
    info = collect()
    typer.echo(json.dumps(info, indent=2) if as_json else render(info))
