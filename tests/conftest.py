import os
import tempfile

import pytest

from tests.linekit import make_root
from tests.tiny_models import tiny_model  # noqa: F401 - one session-wide cache for every test module


def pytest_configure(config):
    """The datasets library writes lock files into its cache even when it
    only streams; the suite's go to a scratch cache, never the machine's
    ~/.cache (tests that need a real cache build their own)."""
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="forge-test-datasets-")


@pytest.fixture
def root(tmp_path):
    return make_root(tmp_path / "root")
