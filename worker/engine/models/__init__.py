"""The networks of BAGEL / Echo-4o, one file each."""

from worker.engine.models.bagel import Bagel, DenoiseLayout, SpecialTokens
from worker.engine.models.qwen2_mot import KVCache, Qwen2MoTForCausalLM
from worker.engine.models.siglip_navit import SiglipNaViTModel
from worker.engine.models.vae import FluxVAE

__all__ = ["Bagel", "DenoiseLayout", "FluxVAE", "KVCache", "Qwen2MoTForCausalLM", "SiglipNaViTModel",
           "SpecialTokens"]
