import pytest

from tests.linekit import make_root


@pytest.fixture
def root(tmp_path):
    return make_root(tmp_path / "root")
