import pytest

from tests.linekit import make_root
from tests.tiny_models import tiny_model  # noqa: F401 - one session-wide cache for every test module


@pytest.fixture
def root(tmp_path):
    return make_root(tmp_path / "root")
