"""How reducers are placed into model families: one adapter per family, chosen by a registry.

Importing this package registers the built-in adapters; see docs/adapters.md to add one.
"""

from tokenreduce.adapters import (  # noqa: F401  (registers the adapters)
    diffusers_models,
    hf_clip,
    hf_clip_text,
    hf_media,
    hf_text,
    hf_vit,
    hf_vlm,
    sentence_transformers,
    timm_eva,
    timm_naflex,
    timm_relpos,
    timm_vit,
)
from tokenreduce.adapters.base import (
    Adapter,
    ModelInfo,
    Patch,
    adapter_for,
    adapters,
    is_patched,
    register_adapter,
)

__all__ = ["Adapter", "ModelInfo", "Patch", "adapter_for", "adapters", "is_patched", "register_adapter"]
