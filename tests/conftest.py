import os

import pytest
import torch

os.environ.setdefault("LOTAQAF_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def smoke():
    from lotaqaf_cli.io.models import smoke_model

    return smoke_model(seed=0)


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(123)
    return torch.randint(3, 256, (8, 32), generator=g)
