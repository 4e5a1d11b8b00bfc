"""Memory modes: how much of the model stays on the card, for cards smaller than the bfloat16 model (27.4 GiB).

A mode is ``full`` or a quantization and/or ``offload``, joined with ``+``:

``full``
    every weight on the device in the load dtype (the default; unchanged behaviour).
``int8``
    the LLM's decoder Linear layers (both experts: q/k/v/o projections and the MLPs, 13.05 B of the 14.69 B
    parameters) as 8-bit weights with one float32 scale per output row (bitsandbytes ``Linear8bitLt``,
    threshold 0: plain int8 matmuls). Embeddings, norms, the heads, the ViT and the VAE stay in the load dtype.
``nf4`` (alias ``int4``)
    the same layers as 4-bit NormalFloat weights, one float32 scale per 64 weights (bitsandbytes
    ``Linear4bit``, no double quantization), computed in the load dtype.
``offload``
    what is idle in the denoising loop lives in host memory and is streamed to the device by accelerate's
    hooks only while it runs: the understanding expert's Linear layers (needed in full while prefilling
    text and ViT tokens, then only for the two frame tokens per guidance branch that wrap the latent query:
    they cannot be dropped, so every step streams these weights once), the ViT with its connector
    (reference images, prefill only) and the VAE (reference encoding and the final decode). The generation
    expert, embeddings and heads stay on the device.
``int8+offload`` / ``nf4+offload``
    both: the understanding expert is streamed in the load dtype (full precision), the generation expert
    stays on the device quantized.

In every mode but ``full`` the text head (``lm_head``, 0.54 B parameters) is not kept: image generation never
uses it. The modes are for serving; fine-tuning loads ``full``.

:func:`expected_memory` computes, from the config alone, the bytes each part takes on the device and in host
memory for a mode (parameters per part x bytes per parameter, quantization scales included);
:func:`measure_memory` counts the same on a loaded model, so the arithmetic is testable; :func:`apply_memory_mode`
does the work after the weights are read (to the CPU); :func:`check_memory_mode` refuses a mode that cannot
run here before anything is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from echo4o.logging import get_logger

log = get_logger(__name__)

QUANTS = ("int8", "nf4")
MODES = ("full", "int8", "nf4", "offload", "int8+offload", "nf4+offload")
_ALIASES = {"int4": "nf4", "bf16": "full", "none": "full", "": "full"}
NF4_BLOCK = 64  # weights per float32 absmax scale in bitsandbytes' 4-bit layout
NF4_CODE_BYTES = 16 * 4  # each quantized Linear keeps its 16-entry float32 code book
_INSTALL = "pip install 'echo4o-server[gpu]' (bitsandbytes)"

PARTS = ("llm_und", "llm_gen", "llm_other", "lm_head", "vit", "heads", "vae")
PART_DOC = {
    "llm_und": "understanding expert: decoder Linear layers without _moe_gen",
    "llm_gen": "generation expert: decoder Linear layers ending in _moe_gen",
    "llm_other": "token embeddings, norms (both experts), rotary buffer",
    "lm_head": "text head (not kept outside full mode)",
    "vit": "SigLIP ViT and its connector",
    "heads": "latent in/out projections, timestep embedder, position tables",
    "vae": "FLUX VAE",
}


@dataclass(frozen=True)
class MemoryMode:
    """A parsed mode: ``quant`` is ``None``, ``"int8"`` or ``"nf4"``; ``offload`` streams the idle parts."""

    quant: str | None = None
    offload: bool = False

    @property
    def name(self) -> str:
        parts = [p for p in (self.quant, "offload" if self.offload else None) if p]
        return "+".join(parts) or "full"

    @property
    def is_full(self) -> bool:
        return self.quant is None and not self.offload

    def __str__(self) -> str:
        return self.name


def parse_memory_mode(text: str | MemoryMode | None) -> MemoryMode:
    """``full``, ``int8``, ``nf4`` (``int4``), ``offload`` or a quantization ``+offload`` (either order, any case);
    anything else is a ``ValueError`` listing the choices."""
    if isinstance(text, MemoryMode):
        return text
    raw = "" if text is None else str(text)
    tokens = [p.strip().lower() for p in raw.replace(",", "+").split("+")]
    tokens = [_ALIASES.get(t, t) for t in tokens]
    if tokens == ["full"]:
        return MemoryMode()
    quants = [t for t in tokens if t in QUANTS]
    offload = tokens.count("offload")
    if any(t not in (*QUANTS, "offload") for t in tokens) or len(quants) > 1 or offload > 1:
        raise ValueError(f"memory mode {raw!r} is not one of {', '.join(MODES)} (int4 is an alias of nf4)")
    return MemoryMode(quant=quants[0] if quants else None, offload=bool(offload))


# ---------------------------------------------------------------------------------------------------
# what can run here
# ---------------------------------------------------------------------------------------------------


def import_bitsandbytes():
    """The bitsandbytes module, imported now (``worker.engine`` hides it from diffusers' and peft's import-time
    probing, see its ``__init__``)."""
    import sys

    if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
        del sys.modules["bitsandbytes"]
    import bitsandbytes

    return bitsandbytes


def quantization_available() -> tuple[bool, str]:
    """``(True, version)`` when bitsandbytes imports, else ``(False, reason with the fix)``."""
    try:
        bitsandbytes = import_bitsandbytes()
    except Exception as exc:  # noqa: BLE001 - a missing or broken native library alike
        return False, f"bitsandbytes is not importable ({type(exc).__name__}: {str(exc)[:160]}); {_INSTALL}"
    return True, f"bitsandbytes {bitsandbytes.__version__}"


def offload_available() -> tuple[bool, str]:
    try:
        import accelerate
    except Exception as exc:  # noqa: BLE001
        return False, f"accelerate is not importable ({type(exc).__name__}); pip install accelerate"
    return True, f"accelerate {accelerate.__version__}"


def available_modes() -> dict[str, tuple[bool, str]]:
    """Each mode: ``(usable, version or reason)`` (what ``echo4o doctor`` prints)."""
    quant, offload = quantization_available(), offload_available()
    out = {"full": (True, "")}
    for name in MODES[1:]:
        mode = parse_memory_mode(name)
        checks = ([quant] if mode.quant else []) + ([offload] if mode.offload else [])
        bad = [why for ok, why in checks if not ok]
        out[name] = (not bad, "; ".join(bad) if bad else ", ".join(why for _ok, why in checks))
    return out


def check_memory_mode(mode: str | MemoryMode, device: torch.device, device_map: dict | None = None) -> MemoryMode:
    """The parsed mode, or a ``ValueError`` naming the fix when it cannot run with these options."""
    mode = parse_memory_mode(mode)
    if mode.is_full:
        return mode
    if device_map:
        raise ValueError(f"memory mode {mode} and a device map cannot be combined: use one (memory_mode='full' "
                         f"with device_map, or device_map=None with memory_mode={mode.name!r})")
    if mode.quant:
        ok, why = quantization_available()
        if not ok:
            raise ValueError(f"memory mode {mode} needs bitsandbytes: {why}")
    if mode.offload:
        ok, why = offload_available()
        if not ok:
            raise ValueError(f"memory mode {mode} needs accelerate: {why}")
    return mode


# ---------------------------------------------------------------------------------------------------
# the arithmetic
# ---------------------------------------------------------------------------------------------------


@dataclass
class PartMemory:
    """One part's parameters and the bytes it takes on the device and in host memory."""

    params: int = 0
    device_bytes: int = 0
    host_bytes: int = 0


@dataclass
class MemoryReport:
    mode: str
    parts: dict[str, PartMemory] = field(default_factory=dict)

    @property
    def device_bytes(self) -> int:
        return sum(p.device_bytes for p in self.parts.values())

    @property
    def host_bytes(self) -> int:
        return sum(p.host_bytes for p in self.parts.values())

    @property
    def params(self) -> int:
        return sum(p.params for p in self.parts.values())

    def summary(self) -> dict:
        """Log-friendly figures in GiB."""
        gib = 2**30
        return {"memory_mode": self.mode, "weights_device_gib": round(self.device_bytes / gib, 2),
                "weights_host_gib": round(self.host_bytes / gib, 2),
                "parts_device_gib": {k: round(v.device_bytes / gib, 3) for k, v in self.parts.items()}}


def part_of(name: str) -> str:
    """The part a parameter or module name of :class:`~worker.engine.models.bagel.Bagel` belongs to (names
    under the VAE are given as ``vae.<name>``)."""
    if name.startswith("vae."):
        return "vae"
    if name.startswith("language_model.lm_head"):
        return "lm_head"
    if name.startswith(("vit_model", "connector")):
        return "vit"
    if name.startswith("language_model."):
        if _is_expert_linear(name):
            return "llm_gen" if "_moe_gen" in name else "llm_und"
        return "llm_other"
    return "heads"


_LINEAR_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_expert_linear(name: str) -> bool:
    """A decoder-layer Linear (module name, or its ``.weight`` / ``.bias``)."""
    if not name.startswith("language_model.model.layers."):
        return False
    parts = name.split(".")
    if parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    leaf = parts[-1].removesuffix("_moe_gen")
    return leaf in _LINEAR_LEAVES


def _quantized_linear_bytes(out_features: int, in_features: int, quant: str) -> int:
    numel = out_features * in_features
    if quant == "int8":
        return numel + out_features * 4  # int8 weight + float32 scale per output row
    return math.ceil(numel / 2) + math.ceil(numel / NF4_BLOCK) * 4 + NF4_CODE_BYTES  # packed nibbles + absmax


def expected_memory(config, mode: str | MemoryMode, dtype: torch.dtype) -> MemoryReport:
    """Bytes per part on the device and in host memory for ``mode`` with weights in ``dtype``, from the
    config alone (the model is built on the meta device: nothing is allocated)."""
    from worker.engine.models.bagel import Bagel
    from worker.engine.models.vae import FluxVAE

    mode = parse_memory_mode(mode)
    size = torch.tensor([], dtype=dtype).element_size()
    with torch.device("meta"):
        model, vae = Bagel(config), FluxVAE(config.vae)
    report = MemoryReport(mode=mode.name, parts={p: PartMemory() for p in PARTS})
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    tensors = [*model.named_parameters(), *model.named_buffers(),
               *((f"vae.{n}", t) for n, t in [*vae.named_parameters(), *vae.named_buffers()])]
    for name, tensor in tensors:
        part = report.parts[part_of(name)]
        # floating tensors load in ``dtype``, except the rotary table, built in float32 after loading
        if name.endswith("inv_freq"):
            elem = 4
        else:
            elem = size if tensor.is_floating_point() else tensor.element_size()
        nbytes = tensor.numel() * elem
        is_param = not name.endswith("inv_freq")
        part.params += tensor.numel() if is_param else 0
        where = _placement(mode, part_of(name))
        if where == "dropped":
            continue
        if where == "device" and mode.quant and part_of(name) in _quantized_parts(mode) and name.endswith(".weight"):
            lin = linears[name.removesuffix(".weight")]
            nbytes = _quantized_linear_bytes(lin.out_features, lin.in_features, mode.quant)
        if where == "host":
            part.host_bytes += nbytes
        else:
            part.device_bytes += nbytes
    return report


def _quantized_parts(mode: MemoryMode) -> tuple[str, ...]:
    if not mode.quant:
        return ()
    return ("llm_gen",) if mode.offload else ("llm_und", "llm_gen")


def _offloaded_parts(mode: MemoryMode) -> tuple[str, ...]:
    return ("llm_und", "vit", "vae") if mode.offload else ()


def _placement(mode: MemoryMode, part: str) -> str:
    if part == "lm_head" and not mode.is_full:
        return "dropped"
    return "host" if part in _offloaded_parts(mode) else "device"


def measure_memory(model: nn.Module, vae: nn.Module, mode: str | MemoryMode = "full") -> MemoryReport:
    """The bytes each part of a loaded model actually holds: tensors not on the meta device count as
    resident (quantization scales and code books included), the weights an offload hook keeps count as
    host memory."""
    report = MemoryReport(mode=parse_memory_mode(mode).name, parts={p: PartMemory() for p in PARTS})
    # ids of what was counted, with the objects kept alive: an id is only unique while its object lives, and
    # some of what bitsandbytes hands out (a quantization state's tensors) may be made afresh on each access
    seen: dict[int, object] = {}
    for prefix, root in (("", model), ("vae.", vae)):
        for mod_name, module in root.named_modules():
            full_name = prefix + mod_name
            part = report.parts[part_of(full_name + ".weight" if mod_name else prefix)]
            # after its first forward, a bitsandbytes int8 Linear keeps its row scales in ``module.state``
            state_scb = getattr(getattr(module, "state", None), "SCB", None)
            if isinstance(state_scb, torch.Tensor) and id(state_scb) not in seen:
                seen[id(state_scb)] = state_scb
                part.device_bytes += state_scb.numel() * state_scb.element_size()
            for _tname, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                for t in _storage_tensors(tensor):
                    if t.device.type == "meta" or id(t) in seen:
                        continue
                    seen[id(t)] = t
                    part.device_bytes += t.numel() * t.element_size()
                is_param = not _tname.endswith("inv_freq")
                part.params += tensor.numel() if is_param and not _is_packed(tensor) else 0
                if _is_packed(tensor):
                    part.params += _packed_numel(module)
            hook = getattr(module, "_hf_hook", None)
            for one in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # SequentialHook
                weights = getattr(one, "weights_map", None)
                store = getattr(weights, "dataset", weights)
                if store is not None and id(store) not in seen:
                    seen[id(store)] = store
                    part.host_bytes += sum(t.numel() * t.element_size() for t in store.values())
    return report


def _is_packed(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "Params4bit"


def _packed_numel(module: nn.Module) -> int:
    return module.out_features * module.in_features


def _storage_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The tensor itself plus the quantization state bitsandbytes hangs on it."""
    out = [tensor]
    scb = getattr(tensor, "SCB", None)
    if isinstance(scb, torch.Tensor):
        out.append(scb)
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        out.extend(t for t in (getattr(state, "absmax", None), getattr(state, "code", None))
                   if isinstance(t, torch.Tensor))
    return out


# ---------------------------------------------------------------------------------------------------
# applying a mode
# ---------------------------------------------------------------------------------------------------


def apply_memory_mode(model: nn.Module, vae: nn.Module, mode: str | MemoryMode, device: torch.device,
                      dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """Put a loaded model (weights anywhere: normally on the CPU, as :func:`load_bagel` reads them for a
    mode) on ``device`` in ``mode``. Returns ``(model, vae)`` in eval mode without gradients."""
    mode = parse_memory_mode(mode)
    device = torch.device(device)
    if mode.is_full:
        return model.to(device), vae.to(device)
    if not mode.is_full:
        model.language_model.lm_head.to("meta")  # never used to generate images
    quantized = _quantized_parts(mode)
    offloaded = _offloaded_parts(mode)
    offload_modules: list[nn.Module] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not _is_expert_linear(name):
            continue
        part = part_of(name + ".weight")
        if part in quantized:
            _replace(model, name, _quantize_linear(module, mode.quant, dtype, device))
        elif part in offloaded:
            offload_modules.append(module)
    if "vit" in offloaded:
        offload_modules += [model.vit_model, model.connector]
    # everything not offloaded goes to the device (quantized Linears quantize on this move)
    for name, child in model.named_children():
        if name not in ("vit_model", "connector") or "vit" not in offloaded:
            _move_except(child, device, set(map(id, offload_modules)))
    for module in offload_modules:
        _offload(module, device)
    if "vae" in offloaded:
        _offload(vae, device)
    else:
        vae.to(device)
    return model.eval().requires_grad_(False), vae.eval().requires_grad_(False)


def _move_except(module: nn.Module, device: torch.device, skip: set[int]) -> None:
    """``module.to(device)`` for every submodule whose id is not in ``skip`` (nor under one that is)."""
    if id(module) in skip:
        return
    for p_name, param in list(module.named_parameters(recurse=False)):
        if param.device.type != "meta":
            _set_param(module, p_name, param, device)
    for b_name, buf in list(module.named_buffers(recurse=False)):
        if buf.device.type != "meta":
            module._buffers[b_name] = buf.to(device)
    for child in module.children():
        _move_except(child, device, skip)


def _set_param(module: nn.Module, name: str, param: torch.Tensor, device: torch.device) -> None:
    if type(param).__module__.startswith("bitsandbytes"):
        module._parameters[name] = param.to(device)  # quantizes on its first move to a device
    elif param.device != device:
        module._parameters[name] = nn.Parameter(param.data.to(device), requires_grad=False)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, new)


def _quantize_linear(linear: nn.Linear, quant: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A bitsandbytes Linear holding ``linear``'s weights, not yet quantized: that happens when it is moved
    to ``device`` (from host memory, as bitsandbytes requires)."""
    bnb = import_bitsandbytes()

    has_bias = linear.bias is not None
    weight = linear.weight.data.to("cpu")
    if quant == "int8":
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                  threshold=0.0, device="meta")
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=dtype,
                                compress_statistics=False, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=False, quant_type="nf4",
                                       blocksize=NF4_BLOCK)
    if has_bias:
        new.bias = nn.Parameter(linear.bias.data.to("cpu"), requires_grad=False)
    return new


def _offload(module: nn.Module, device: torch.device) -> None:
    """Weights of ``module`` stay in host memory (pinned when the device is a GPU, for faster copies) and
    are copied to ``device`` by accelerate's hooks around each forward of its submodules."""
    from accelerate import cpu_offload

    state = {k: v.detach().to("cpu") for k, v in module.state_dict().items()}
    if device.type == "cuda":
        state = {k: v.pin_memory() for k, v in state.items()}
    cpu_offload(module, execution_device=device, state_dict=state)


def describe(report: MemoryReport) -> str:
    """One line: device and host GiB of a report."""
    return (f"{report.mode}: {report.device_bytes / 2**30:.2f} GiB of weights on the device, "
            f"{report.host_bytes / 2**30:.2f} GiB in host memory")
