import pytest
import torch

# The suite's models are tiny: one intra-op thread runs them fastest, and two OpenMP threads on a
# loaded 2-core machine spin against each other (a 64 px tiny-model forward measured 0.8 s at 2
# threads against 2 ms at 1). Tests that time or need threads set them themselves.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: they skip on CPU-only machines such as CI."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
