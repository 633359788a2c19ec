import os
import tempfile

import pytest
import torch

# The plan cache (see chunkjac/_plancache.py) in a folder of the test run's own, never the user's
# (subprocesses the tests start inherit it); tests that exercise it point it elsewhere.
os.environ["CHUNKJAC_CACHE_DIR"] = tempfile.mkdtemp(prefix="chunkjac-test-cache-")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
