"""GPU-only dependencies, detected without importing them: Transformer Engine, vLLM, NVIDIA apex
(except `transformer_engine_import_error`, which imports Transformer Engine to see that it works).

None is required. NVIDIA apex is not on PyPI; the PyPI package named `apex` is an unrelated web
toolkit, and megatron-core decides "apex is installed" from `import apex` alone in places, so a
stray PyPI `apex` would send megatron down apex-only code paths. `check_apex()` tells them apart by
NVIDIA apex's own submodules and raises with the fix.
"""
from __future__ import annotations

import functools
import importlib.util


def available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def transformer_engine_available() -> bool:
    return available("transformer_engine")


@functools.cache
def transformer_engine_import_error() -> Exception | None:
    """None when Transformer Engine's PyTorch API imports, else the failure. This one imports: a
    broken build (CUDA or torch ABI mismatch) is found by `find_spec` and fails only on import,
    with OSError or RuntimeError as often as ImportError."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - the caller reports whatever the import raised
        return exc
    return None


def vllm_available() -> bool:
    return available("vllm")


def nvidia_apex_available() -> bool:
    """True only for NVIDIA apex (it ships apex.optimizers and apex.normalization)."""
    return available("apex") and available("apex.optimizers") and available("apex.normalization")


def check_apex() -> None:
    if available("apex") and not nvidia_apex_available():
        raise RuntimeError(
            "a package named 'apex' is installed but it is not NVIDIA apex (no apex.optimizers / "
            "apex.normalization): it is most likely the unrelated PyPI 'apex' web toolkit, which "
            "misleads megatron-core. Uninstall it (pip uninstall apex); NVIDIA apex is optional "
            "and is built from source (github.com/NVIDIA/apex).")
