"""Fixtures shared by the tests/data files (a file may define its own `processor` instead)."""
import pytest

from megatron_vlm.data.processor import MultimodalProcessor
from tests.data.digits_fixtures import demo_assets


@pytest.fixture(scope="module")
def processor():
    """The small digits demo's processor."""
    return MultimodalProcessor.from_pretrained(demo_assets()["model"])
