"""Layer spec and MoE speed switches per device (models/specs.py BackendConfig).

No GPU and no Transformer Engine here: "cuda" is only a device name passed to the config code, the
TE probe is monkeypatched (its failure, or its success), and so are the fused-permute kernels
megatron's TransformerConfig looks up when permute fusion is on.
"""
import pytest

from megatron_vlm.config import load_config
from megatron_vlm.models import specs
from megatron_vlm.models.language import LanguageModelConfig, transformer_config
from megatron_vlm.models.specs import BackendConfig, decoder_block_spec
from megatron_vlm.parallel import optional
from megatron_vlm.parallel.config import ParallelConfig

BROKEN = ImportError("libtransformer_engine.so: undefined symbol: _ZN3c104cuda9SetDevice")


@pytest.fixture
def te_broken(monkeypatch):
    monkeypatch.setattr(optional, "transformer_engine_import_error", lambda: BROKEN)


@pytest.fixture
def te_present(monkeypatch):
    """TE "imports", and the fused permute kernels megatron checks for are defined."""
    from megatron.core.transformer.moe import moe_utils

    monkeypatch.setattr(optional, "transformer_engine_import_error", lambda: None)
    for name in ("fused_permute", "fused_permute_with_probs", "fused_sort_chunks_by_index",
                 "fused_sort_chunks_by_index_with_probs", "fused_unpermute"):
        monkeypatch.setattr(moe_utils, name, lambda *a, **k: None, raising=False)  # TE-only names


def config_for(device_type, **backend):
    return transformer_config(LanguageModelConfig(), ParallelConfig(), device_type,
                              backend=BackendConfig(**backend))


def test_cuda_without_transformer_engine_is_an_error_with_the_import_failure(te_broken):
    with pytest.raises(RuntimeError, match="undefined symbol: _ZN3c104cuda9SetDevice") as err:
        config_for("cuda")
    assert "runtime.backend.layer_spec: local" in str(err.value)  # the way out is named
    assert err.value.__cause__ is BROKEN


def test_local_spec_on_cuda_is_built_without_transformer_engine(te_broken, single_rank_runtime):
    from megatron_vlm.models.attention import CoreAttention

    config = config_for("cuda", layer_spec="local")
    assert config.transformer_impl == "local"
    assert not config.moe_grouped_gemm and not config.moe_permute_fusion
    spec = decoder_block_spec(config, "cuda")
    assert spec.layer_specs[0].submodules.self_attention.submodules.core_attention is CoreAttention


def test_moe_switches_default_per_device(te_present):
    cuda, cpu = config_for("cuda"), config_for("cpu")
    assert cuda.transformer_impl == "transformer_engine"
    assert cuda.moe_grouped_gemm and cuda.moe_permute_fusion
    assert cpu.transformer_impl == "local"
    assert not cpu.moe_grouped_gemm and not cpu.moe_permute_fusion


def test_explicit_switch_wins(te_present):
    cuda = config_for("cuda", moe_grouped_gemm=False)
    assert not cuda.moe_grouped_gemm and cuda.moe_permute_fusion
    assert not config_for("cuda", moe_permute_fusion=False).moe_permute_fusion
    cfg = load_config(None, ["runtime.backend={layer_spec: te, moe_grouped_gemm: false}"])
    assert cfg.runtime.backend == BackendConfig(layer_spec="te", moe_grouped_gemm=False)


@pytest.mark.parametrize("backend, device, message", [
    (dict(moe_grouped_gemm=True), "cpu", "runtime.backend.moe_grouped_gemm=true needs the Transformer Engine"),
    (dict(moe_permute_fusion=True, layer_spec="local"), "cuda", "runtime.backend.moe_permute_fusion=true"),
    (dict(layer_spec="te"), "cpu", "runtime.backend.layer_spec=te needs device cuda"),
])
def test_switches_the_device_cannot_honour_are_refused(backend, device, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        BackendConfig(**backend).transformer_config_kwargs(device)


def test_bad_backend_values_name_the_field():
    with pytest.raises(ValueError, match="runtime.backend.layer_spec must be one of"):
        load_config(None, ["runtime.backend.layer_spec=transformer_engine"])
    with pytest.raises(ValueError, match="runtime.backend.moe_grouped_gemm: expected bool | null"):
        load_config(None, ["runtime.backend.moe_grouped_gemm=yes please"])


def test_a_cpu_built_config_is_not_given_the_te_spec_on_cpu(te_present):
    with pytest.raises(ValueError, match="asks for Transformer Engine on cpu"):
        specs.decoder_block_spec(config_for("cuda"), "cpu")
