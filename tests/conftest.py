import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Tests share 2 cores with data-loader workers; more intra-op threads only add contention.
torch.set_num_threads(2)


@pytest.fixture
def tokenizer(tmp_path):
    from helpers import make_tokenizer

    return make_tokenizer(tmp_path)
