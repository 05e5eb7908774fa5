"""A small training loop for the models that chapters train from zero (positions, Mamba tasks).

`train` runs AdamW with linear warm-up and cosine decay on batches from `next_batch(step)`
and returns the loss curve; the loss is next-token cross-entropy unless `loss_fn` says otherwise.
"""

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def lm_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of model(inputs) (B, N, V) against targets (B, N); -100 targets are ignored."""
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def train(model: torch.nn.Module, next_batch: Callable[[int], tuple], *, steps: int, lr: float = 3e-3,
          weight_decay: float = 0.0, warmup: int = 20, loss_fn: Callable = lm_loss, seed: int = 0,
          params=None, desc: str = "training") -> list[float]:
    """Train for `steps` AdamW steps on (inputs, targets) = next_batch(step); returns the losses.

    `params` restricts what is trained (LoRA trains adapters only); by default every parameter
    that requires grad.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    torch.manual_seed(seed)
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, mininterval=2.0)
    for step in bar:
        inputs, targets = next_batch(step)
        loss = loss_fn(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    print(f"{desc}: {steps} steps in {time.perf_counter() - start:.1f} s, final loss {losses[-1]:.3f}")
    return losses
