"""Model families, looked up by the HF architecture name in a checkpoint's config.json."""
from __future__ import annotations

import importlib

_FAMILIES = {
    "Qwen3VLMoeForConditionalGeneration": "megatron_vlm.models.qwen3_vl_moe.provider",
    "Qwen3VLForConditionalGeneration": "megatron_vlm.models.qwen3_vl.provider",
    "Qwen2_5_VLForConditionalGeneration": "megatron_vlm.models.qwen2_5_vl.provider",
}


def supported_architectures() -> list[str]:
    return sorted(_FAMILIES)


def family_for(hf_config_or_architecture):
    """The `Family` for an HF config (its `architectures[0]`) or an architecture name."""
    arch = hf_config_or_architecture
    if not isinstance(arch, str):
        archs = getattr(arch, "architectures", None) or []
        if not archs:
            raise ValueError("the HF config has no 'architectures' entry; supported: "
                             + ", ".join(supported_architectures()))
        arch = archs[0]
    if arch not in _FAMILIES:
        raise ValueError(f"unsupported architecture {arch!r}; supported: "
                         + ", ".join(supported_architectures()))
    return importlib.import_module(_FAMILIES[arch]).FAMILY
