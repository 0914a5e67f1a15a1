"""Which HF config describes a VLM run's model: the run reads it, `plan` and `check` count it.

`resolve_hf_config(vlm)` looks, in order, at
  vlm.assets/model       what the run builds from (config, tokenizer, processor);
  vlm.init_from          the weights directory, when the assets are not there yet (for a
                         megatron_vlm checkpoint, the HF config it carries in hf/);
  vlm.model_config       a copy of the config kept for planning where neither is at hand (the GPU
                         recipes point at configs/hf/...): refused if it disagrees with one found
                         above, so a plan can never describe another model than the run builds;
  the digits demo        with vlm.build_demo_assets, the config `build_demo_assets` would write,
                         built in memory: `plan` writes nothing, and the assets it would write
                         hold exactly that config.
It never writes. Every source is a directory holding `config.json`.
"""
from __future__ import annotations

from pathlib import Path

DEMO = "the digits demo's model (vlm.build_demo_assets; assets not written yet)"


def resolve_hf_config(vlm):
    """(HF config, where it was read) of the model a run with `vlm` builds."""
    found = [d for d in _model_dirs(vlm) if (d / "config.json").is_file()]
    copy = _read_copy(vlm.model_config) if vlm.model_config else None
    if found:
        config, source = _read(found[0]), str(found[0] / "config.json")
        if copy is not None:
            _check_same_model(config, source, copy, vlm.model_config)
        return config, source
    if copy is not None:
        return copy, str(Path(vlm.model_config) / "config.json")
    if vlm.build_demo_assets:
        from megatron_vlm.data.digits import demo_hf_config

        return demo_hf_config(), DEMO
    tried = ", ".join(str(d / "config.json") for d in _model_dirs(vlm)) or "no vlm.assets"
    raise FileNotFoundError(f"no HF config for the model ({tried} not found); set vlm.model_config "
                            f"to a directory with the model's config.json to plan without it")


def _model_dirs(vlm) -> list[Path]:
    from megatron_vlm.checkpoint.convert import META

    dirs = [Path(vlm.assets) / "model"] if vlm.assets else []
    if vlm.init_from:
        weights = Path(vlm.init_from)
        dirs.append(weights / "hf" if (weights / META).is_file() else weights)
    return dirs


def _read(directory: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(directory))


def _read_copy(directory: str):
    if not (Path(directory) / "config.json").is_file():
        raise FileNotFoundError(f"vlm.model_config: {Path(directory) / 'config.json'} not found")
    return _read(Path(directory))


def _check_same_model(config, source: str, copy, copy_dir: str) -> None:
    from megatron_vlm.models import family_for

    def shape(c):
        family = family_for(c)
        return family.architecture, family.language_config(c), family.vision_parameters(c)

    if shape(config) != shape(copy):
        raise ValueError(f"vlm.model_config ({copy_dir}) describes another model than {source}: "
                         f"{shape(copy)} vs {shape(config)}; fix or drop vlm.model_config")
