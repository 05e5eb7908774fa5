"""The synthetic tasks of the Mamba paper (Sec. 4.1) that show why selectivity matters.

- Selective copying (Jing et al. 2019; Mamba Fig. 2): a few data tokens lie at random places in a
  sequence of noise tokens; at the end the model must reproduce them in order. Fixed spacing
  (the plain copying task) is solved by any LTI convolution; random spacing needs a model that
  decides per token what to keep — content-aware, "selective" — memory.
- Induction heads (Olsson et al. 2022): a trigger token appears once, followed by an answer token;
  when the trigger appears again at the end, the model must output that answer. Associative
  recall in its simplest form; trained at one length, tested at longer ones (extrapolation).

Every generator returns (inputs, targets), two (B, L) int64 tensors for next-token training
(`lectlib.train.lm_loss`): targets are -100 except where the task asks a question.
"""

import torch

from .llama import Llama, LlamaConfig
from .ssm import MambaConfig, MambaLM

IGNORE = -100


def _check(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def selective_copying_vocab(n_tokens: int) -> int:
    """Vocabulary of `selective_copying`: 0 is noise, 1…n_tokens are data, n_tokens+1 the copy marker."""
    return n_tokens + 2


def selective_copying(batch: int, *, seq_len: int, n_memorize: int, n_tokens: int, generator=None):
    """Selective copying: (inputs, targets) of shape (batch, seq_len + n_memorize).

    inputs = seq_len tokens, all noise (0) except `n_memorize` data tokens (1…n_tokens) at random
    sorted positions, then `n_memorize` copy markers (n_tokens + 1). At the i-th marker the target
    is the i-th data token; everywhere else -100.
    """
    _check(batch=batch, seq_len=seq_len, n_memorize=n_memorize, n_tokens=n_tokens)
    if n_memorize > seq_len:
        raise ValueError(f"n_memorize={n_memorize} data tokens do not fit in seq_len={seq_len}")
    data = torch.randint(1, n_tokens + 1, (batch, n_memorize), generator=generator)
    places = torch.rand(batch, seq_len, generator=generator).argsort(1)[:, :n_memorize].sort(1).values
    context = torch.zeros(batch, seq_len, dtype=torch.long).scatter(1, places, data)
    markers = torch.full((batch, n_memorize), n_tokens + 1, dtype=torch.long)
    inputs = torch.cat([context, markers], 1)
    targets = torch.cat([torch.full((batch, seq_len), IGNORE), data], 1)
    return inputs, targets


def induction_heads_vocab(n_tokens: int) -> int:
    """Vocabulary of `induction_heads`: 0…n_tokens-1 are ordinary tokens, n_tokens the trigger."""
    return n_tokens + 1


def induction_heads(batch: int, *, seq_len: int, n_tokens: int, generator=None):
    """Induction heads: (inputs, targets) of shape (batch, seq_len).

    Random tokens (0…n_tokens-1); the trigger (n_tokens) at one random position p < seq_len - 2,
    followed by the answer at p + 1; the last input is the trigger again and its target is the
    answer (every other target is -100).
    """
    _check(batch=batch, seq_len=seq_len, n_tokens=n_tokens)
    if seq_len < 4:
        raise ValueError(f"seq_len must be at least 4, got {seq_len}")
    inputs = torch.randint(0, n_tokens, (batch, seq_len), generator=generator)
    trigger = torch.randint(0, seq_len - 3, (batch,), generator=generator)
    rows = torch.arange(batch)
    inputs[rows, trigger] = n_tokens
    inputs[:, -1] = n_tokens
    targets = torch.full((batch, seq_len), IGNORE)
    targets[:, -1] = inputs[rows, trigger + 1]
    return inputs, targets


@torch.no_grad()
def accuracy(model, inputs: torch.Tensor, targets: torch.Tensor, *, batch_size: int = 256) -> float:
    """Fraction of the asked positions (targets != -100) where argmax model(inputs) is the target."""
    if inputs.shape != targets.shape:
        raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must have one shape")
    was_training = model.training
    model.eval()
    correct = total = 0
    for start in range(0, inputs.shape[0], batch_size):
        x, y = inputs[start:start + batch_size], targets[start:start + batch_size]
        asked = y != IGNORE
        predicted = model(x).argmax(-1)
        correct += int((predicted[asked] == y[asked]).sum())
        total += int(asked.sum())
    model.train(was_training)
    return correct / max(total, 1)


def small_models(vocab_size: int, *, d_model: int = 32, n_layers: int = 2, d_state: int = 8, seed: int = 0) -> dict:
    """The three models the chapter compares, of similar size: a selective Mamba, the same Mamba
    with Δ, B, C fixed (LTI) and a Transformer (lectlib's Llama, RoPE, 4 heads)."""
    torch.manual_seed(seed)
    mamba = MambaLM(MambaConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, d_state=d_state))
    torch.manual_seed(seed)
    lti = MambaLM(MambaConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, d_state=d_state,
                              selective=False))
    torch.manual_seed(seed)
    attention = Llama(LlamaConfig(vocab_size=vocab_size, dim=d_model, n_layers=n_layers, n_heads=4, n_kv_heads=4,
                                  head_dim=d_model // 4, hidden_dim=2 * d_model, rope_theta=10000.0,
                                  max_positions=1 << 16))
    return {"Mamba (selective)": mamba, "LTI SSM": lti, "Transformer": attention}
