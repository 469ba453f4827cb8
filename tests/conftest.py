import os
import sys
from pathlib import Path

import pytest
import torch

# Never reach the real Hub from tests; every Hub test points HF_ENDPOINT at a local server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))  # `import tiny_models` from any test


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: on two shared cores, OpenMP spin-waits make tiny-model
    forwards 10-100x slower with two threads. Opt in with usefixtures("one_torch_thread")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
