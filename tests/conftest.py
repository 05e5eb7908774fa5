import pytest
import torch


@pytest.fixture(scope="session")
def smollm():
    """(lectlib Llama, tokenizer) of SmolLM2-135M, loaded once per test session."""
    from lectlib import models

    return models.load()


@pytest.fixture(scope="session")
def smollm_hf():
    """(transformers LlamaForCausalLM, tokenizer) of SmolLM2-135M: the oracle."""
    from lectlib import models

    return models.load_hf()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
