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


@pytest.fixture
def full_forward_greedy():
    """The oracle of every `generate`: greedy tokens from a full forward over the growing sequence
    at each step, with no cache or state. Returns tokens(model, prompt (B, N), n) -> (B, n)."""

    @torch.no_grad()
    def tokens(model, prompt, n):
        ids = prompt
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], 1)
        return ids[:, prompt.shape[1]:]

    return tokens


@pytest.fixture
def one_thread():
    """Run a test on one thread: tiny tensors gain nothing from a second core that may be busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
