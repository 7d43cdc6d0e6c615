import os

import lotaqaf_kernels as kernels
import pytest
import torch

pytest_plugins = ["cli_helpers"]  # its fixtures (in_tmp) for every test module

os.environ.setdefault("LOTAQAF_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))
if not torch.cuda.is_available():  # the Triton kernels run on CPU tensors in triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def mode():
    """Set the kernel mode for one test (``mode("torch")``); the previous one is restored after it."""
    before = kernels.mode()
    yield kernels.set_mode
    kernels.set_mode(before)


@pytest.fixture
def smoke():
    from lotaqaf_cli.io.models import smoke_model

    return smoke_model(seed=0)


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(123)
    return torch.randint(3, 256, (8, 32), generator=g)


@pytest.fixture(scope="session")
def smollm2_loaded():
    """The embedded SmolLM2-135M-Instruct, loaded once per test session (~20 s on 2 cores)."""
    from lotaqaf_cli.io.models import load_model

    return load_model("embedded:smollm2")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (scripts/gpu_check.sh runs these on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
