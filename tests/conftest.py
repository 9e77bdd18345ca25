import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2 HF folder (converted once, cached under $BITSMITH_CACHE)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from bitsmith.models.zoo import smollm2_path

    return smollm2_path()
