"""GPU-only dependencies are optional, and a stray PyPI `apex` is refused with the fix."""
import sys

import pytest

from megatron_vlm.parallel import optional


def test_cpu_install_has_no_gpu_dependencies_and_picks_the_local_spec():
    from megatron_vlm.models.specs import BackendConfig

    assert BackendConfig().resolve_layer_spec("cpu") == "local"
    if not optional.transformer_engine_available():
        assert optional.transformer_engine_import_error() is not None


def test_pypi_apex_lookalike_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "apex"
    fake.mkdir()
    (fake / "__init__.py").write_text("# an unrelated web toolkit\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "apex", raising=False)
    assert optional.available("apex") and not optional.nvidia_apex_available()
    with pytest.raises(RuntimeError, match="not NVIDIA apex"):
        optional.check_apex()


def test_no_requirement_or_extra_names_apex():
    import re
    from importlib.metadata import requires

    names = {re.split(r"[\s\[<>=!;~]", r, maxsplit=1)[0].lower() for r in requires("megatron_vlm")}
    assert "megatron-core" in names and "apex" not in names
