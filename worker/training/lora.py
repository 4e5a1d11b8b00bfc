"""LoRA on the generation expert with peft: inject, merge into plain weights, save and apply an adapter.

The adapter targets the ``_moe_gen`` copies only (the weights that latent tokens go through): in every decoder
layer ``q_proj_moe_gen``, ``k_proj_moe_gen``, ``v_proj_moe_gen``, ``o_proj_moe_gen`` and the three projections of
``mlp_moe_gen``. Merging gives a model in the released layout (``merged_state_dict``); the adapter alone is
``adapter_model.safetensors`` + ``adapter_config.json`` (peft's file names), which :func:`apply_adapter` merges
into a loaded model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

TARGET_MODULES = (r".*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)_moe_gen"
                  r"|.*\.mlp_moe_gen\.(gate_proj|up_proj|down_proj)")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def lora_config(rank: int, alpha: float, dropout: float = 0.0) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGET_MODULES, bias="none")


def add_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Inject the adapter in place, freeze everything else; returns the trainable parameter names."""
    inject_adapter_in_model(config, model)
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" in name:
            names.append(name)
    if not names:
        raise RuntimeError("LoRA found no generation-expert projection to adapt; is this a BAGEL MoT model?")
    return names


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with each adapter merged in, under the released names (no ``base_layer``, no
    ``lora_`` tensors). The model itself is left unmerged."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    with torch.no_grad():
        for m in layers:
            m.merge()
        try:
            state = {}
            for name, tensor in model.state_dict().items():
                if "lora_" in name:
                    continue
                state[name.replace(".base_layer.", ".")] = tensor.detach().clone()
        finally:
            for m in layers:
                m.unmerge()
    return state


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors, named as in the model with peft's adapter name removed."""
    return {name.replace(".default", ""): t.detach().clone().contiguous()
            for name, t in model.state_dict().items() if "lora_" in name}


def save_adapter(model: nn.Module, config: LoraConfig, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    data = config.to_dict()
    data = {k: (sorted(v) if isinstance(v, set) else v) for k, v in data.items()}
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def apply_adapter(model: nn.Module, adapter_dir: str | Path) -> None:
    """Merge a saved adapter into ``model`` (a loaded :class:`~worker.engine.models.bagel.Bagel`) in place,
    leaving plain weights (what a worker does before generating with an adapter version)."""
    adapter_dir = Path(adapter_dir)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (adapter_dir / name).is_file():
            raise FileNotFoundError(f"{adapter_dir} lacks {name}; an adapter folder needs {ADAPTER_WEIGHTS} and "
                                    f"{ADAPTER_CONFIG} as the trainer writes them")
    data = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    config = lora_config(int(data["r"]), float(data["lora_alpha"]))
    dtype = next(model.parameters()).dtype
    inject_adapter_in_model(config, model)
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            target = name.replace("lora_A.", "lora_A.default.").replace("lora_B.", "lora_B.default.")
            if target not in params:
                raise ValueError(f"adapter tensor {name} has no place in this model; the adapter was trained on "
                                 f"another base")
            params[target].copy_(t.to(params[target].dtype))
    state = merged_state_dict(model)
    _remove_lora(model)
    model.load_state_dict(state, strict=True)
    model.to(dtype).requires_grad_(False)


def _remove_lora(model: nn.Module) -> None:
    """Replace every LoRA wrapper by its base layer (the adapter was merged already)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
