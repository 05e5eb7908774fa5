"""Mamba (Gu & Dao 2023): the selective scan, the Mamba block and a small Mamba language model.

A state-space layer keeps, per channel d, a state h ∈ R^N and runs the discretised recurrence
(Mamba, eqs. 2a-2b, with the zero-order hold for A and the simplified B̄ = Δ·B of Sec. 3.5):

    Ā_t = exp(Δ_t A)        B̄_t = Δ_t B_t
    h_t = Ā_t ⊙ h_{t-1} + B̄_t x_t          y_t = C_t · h_t + D x_t           y_t ← y_t · SiLU(z_t)

"Selective" means that Δ, B and C are functions of the input x_t (computed by the block), so the
model can decide per token how much to remember (small Δ: keep the state) or to reset
(large Δ: forget the state and take in x_t). That breaks the convolution form of LTI SSMs, so the
recurrence is computed by a scan. Three scans agree here:
- `selective_scan_sequential`: the loop over t, written from the equations (`selective_scan_step`);
- `selective_scan_parallel`: a work-efficient, log-depth scan (Blelloch 1990, in its recursive
  odd/even form) with the associative operator `scan_combine`; differentiable by autograd;
- `lectlib.ssm_triton.selective_scan_triton`: a Triton kernel (compiled on a GPU, Triton's
  interpreter on a CPU).

Layout (one convention for every scan):
    x, delta, z: (B, L, D)   A: (D, N)   B, C: (B, L, N)   D: (D,)   h0 and the last state: (B, D, N)
with B the batch, L the sequence, D the channels (d_inner) and N the state size (d_state).
Every scan returns (y (B, L, D), h_L (B, D, N)); h_L continues generation step by step.

The Mamba block and the language model follow Hugging Face's MambaForCausalLM parameter names,
so its state dict loads as it is (the tests use transformers as the oracle).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .llama import RMSNorm, check_token_ids, greedy_decode

SCANS = ("parallel", "sequential", "triton")


def check_scan_inputs(x, delta, A, B, C, D=None, z=None, h0=None) -> None:
    """Raise ValueError unless the arguments have the layout of the module docstring."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be (batch, seq, channels), got {getattr(x, 'shape', type(x).__name__)}")
    b, length, d = x.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (channels={d}, d_state), got {tuple(A.shape)}")
    n = A.shape[1]
    expected = {"delta": (delta, (b, length, d)), "B": (B, (b, length, n)), "C": (C, (b, length, n)),
                "D": (D, (d,)), "z": (z, (b, length, d)), "h0": (h0, (b, d, n))}
    for name, (value, shape) in expected.items():
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(f"{name} must be {shape} for x {tuple(x.shape)} and A {tuple(A.shape)}, "
                             f"got {tuple(value.shape)}")


def selective_scan_step(h, x, delta, A, B, C, D=None):
    """One step of the discretised recurrence: h ← exp(Δ A) ⊙ h + (Δ x) B,  y = C · h + D x.

    h (B, D, N) the state before; x, delta (B, D) this token's input and step size; A (D, N);
    B, C (B, N); D (D,) or None. Returns (y (B, D), h (B, D, N)).

    Shown in chapter 8.
    """
    h = torch.exp(delta[..., None] * A) * h + (delta * x)[..., None] * B[:, None, :]
    y = torch.einsum("bdn,bn->bd", h, C)
    if D is not None:
        y = y + D * x
    return y, h


def _finish(y, x, D, z):
    """The skip connection D·x and the gate SiLU(z) of the Mamba block, shared by every scan."""
    if D is not None:
        y = y + D * x
    if z is not None:
        y = y * F.silu(z)
    return y


def selective_scan_sequential(x, delta, A, B, C, D=None, z=None, *, h0=None):
    """The reference: `selective_scan_step` for t = 1 … L. Returns (y (B, L, D), h_L (B, D, N)).

    Shown in chapter 8."""
    check_scan_inputs(x, delta, A, B, C, D, z, h0)
    h = x.new_zeros(x.shape[0], x.shape[2], A.shape[1]) if h0 is None else h0
    ys = []
    for t in range(x.shape[1]):
        y, h = selective_scan_step(h, x[:, t], delta[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)
    return _finish(y, x, D, z), h


def scan_combine(first, second):
    """The associative operator of the scan: compose two affine maps h ↦ a h + b, `first` applied first.

    (a₁, b₁) then (a₂, b₂) is h ↦ a₂ (a₁ h + b₁) + b₂, i.e. (a₁ a₂, a₂ b₁ + b₂). Associativity
    lets a parallel scan group the steps in any tree; elementwise on tensors of any shape.

    Shown in chapter 8.
    """
    a1, b1 = first
    a2, b2 = second
    return a1 * a2, a2 * b1 + b2


def linear_scan(a, b):
    """All states of h_t = a_t h_{t-1} + b_t, h_0 = 0, along dim 1: a work-efficient parallel scan.

    Blelloch's scan in its recursive form: combine neighbouring steps (2i, 2i+1) with
    `scan_combine` into a sequence half as long, scan that (it gives the odd states), then
    recover each even state from the odd state before it. O(L) work, O(log L) depth, and every
    operation is a tensor op over the whole sequence, so autograd differentiates it.
    a, b: (B, L, ...) of the same shape. Returns h (B, L, ...).

    Shown in chapter 8.
    """
    length = a.shape[1]
    if length == 1:
        return b
    if length % 2:  # pad with the identity map (a = 1, b = 0), which changes no state
        h = linear_scan(torch.cat([a, torch.ones_like(a[:, :1])], 1), torch.cat([b, torch.zeros_like(b[:, :1])], 1))
        return h[:, :length]
    # unbind (not strided slicing) so that the backward is a stack, not zero-filled scatters
    (a_even, a_odd), (b_even, b_odd) = a.unflatten(1, (-1, 2)).unbind(2), b.unflatten(1, (-1, 2)).unbind(2)
    h_odd = linear_scan(*scan_combine((a_even, b_even), (a_odd, b_odd)))
    h_before_even = torch.cat([torch.zeros_like(h_odd[:, :1]), h_odd[:, :-1]], 1)
    h_even = a_even * h_before_even + b_even
    return torch.stack([h_even, h_odd], 2).flatten(1, 2)


def discretize(x, delta, A, B):
    """Ā = exp(Δ A) and B̄ x = (Δ x) B for every token: two (B, L, D, N) tensors."""
    return torch.exp(delta[..., None] * A), (delta * x)[..., None] * B[:, :, None, :]


def selective_scan_parallel(x, delta, A, B, C, D=None, z=None, *, h0=None):
    """The selective scan by `linear_scan`. Returns (y (B, L, D), h_L (B, D, N)).

    It materializes the (B, L, D, N) states, as the paper's "naive" scan does; the fused kernel
    (ssm_triton) keeps them on chip instead.
    """
    check_scan_inputs(x, delta, A, B, C, D, z, h0)
    if x.shape[1] == 0:
        h = x.new_zeros(x.shape[0], x.shape[2], A.shape[1]) if h0 is None else h0
        return x.new_zeros(x.shape), h
    a, bx = discretize(x, delta, A, B)
    if h0 is not None:  # the initial state enters as the first step's input: b₁ += a₁ h0
        bx = torch.cat([bx[:, :1] + a[:, :1] * h0[:, None], bx[:, 1:]], 1)
    h = linear_scan(a, bx)  # (B, L, D, N)
    y = torch.einsum("bldn,bln->bld", h, C)
    return _finish(y, x, D, z), h[:, -1]


def selective_scan(x, delta, A, B, C, D=None, z=None, *, h0=None, method: str = "parallel"):
    """The selective scan by `method` in SCANS; see the module docstring for the layout."""
    if method == "parallel":
        return selective_scan_parallel(x, delta, A, B, C, D, z, h0=h0)
    if method == "sequential":
        return selective_scan_sequential(x, delta, A, B, C, D, z, h0=h0)
    if method == "triton":
        from .ssm_triton import selective_scan_triton

        return selective_scan_triton(x, delta, A, B, C, D, z, h0=h0)
    raise ValueError(f"method must be one of {SCANS}, got {method!r}")


@dataclass
class MambaConfig:
    """The shape of a Mamba LM (Mamba paper, Sec. 3.4). `selective=False` is the LTI ablation.

    d_inner = expand · d_model channels; dt_rank = ceil(d_model / 16) by default. With
    selective=False, Δ, B and C are learned constants instead of functions of the input (the
    same block otherwise: an S4D-like LTI SSM, the paper's "S4" row in Table 1).
    """

    vocab_size: int = 16
    d_model: int = 64
    n_layers: int = 2
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    norm_eps: float = 1e-5
    selective: bool = True
    scan: str = "parallel"
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "d_state", "d_conv", "expand"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.scan not in SCANS:
            raise ValueError(f"scan must be one of {SCANS}, got {self.scan!r}")
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model


class MambaLayerState:
    """What one Mamba layer keeps between tokens: the last d_conv-1 conv inputs and the SSM state."""

    def __init__(self, conv: torch.Tensor, ssm: torch.Tensor):
        self.conv = conv  # (B, d_inner, d_conv - 1)
        self.ssm = ssm  # (B, d_inner, d_state)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv, self.ssm))


class MambaState:
    """The recurrent state of every Mamba layer of a model: constant size, whatever the context.

    Layers fill it on their first call (`layers[i]`); `seen` counts the tokens consumed.
    """

    def __init__(self):
        self.layers: dict[int, MambaLayerState] = {}
        self.seen = 0

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.layers.values())


def _init_dt_bias(n: int, dt_min: float = 1e-3, dt_max: float = 0.1) -> torch.Tensor:
    """Inverse softplus of Δ drawn log-uniformly in [dt_min, dt_max] (Mamba's initialisation)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return dt + torch.log(-torch.expm1(-dt))


class MambaMixer(nn.Module):
    """The Mamba block (Fig. 3): in-projection to (x, z), causal depthwise conv, SiLU, selective SSM
    gated by SiLU(z), out-projection. Input and output (B, L, d_model).

    With a `MambaLayerState` the block continues from it and leaves its new state there: a
    sequence (prefill) or a single token (recurrent step) go through the same code.
    """

    def __init__(self, config: MambaConfig, layer: int = 0):
        super().__init__()
        self.config, self.layer = config, layer
        d, n = config.d_inner, config.d_state
        self.in_proj = nn.Linear(config.d_model, 2 * d, bias=False)
        self.conv1d = nn.Conv1d(d, d, config.d_conv, groups=d, padding=config.d_conv - 1, bias=True)
        if config.selective:
            self.x_proj = nn.Linear(d, config.dt_rank + 2 * n, bias=False)
            self.dt_proj = nn.Linear(config.dt_rank, d, bias=True)
        else:
            self.dt_bias = nn.Parameter(torch.empty(d))
            self.B = nn.Parameter(torch.randn(n) / math.sqrt(n))
            self.C = nn.Parameter(torch.randn(n) / math.sqrt(n))
        # S4D-real initialisation A = -(1, 2, …, N) per channel, stored as log(-A) so A stays negative.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = nn.Linear(d, config.d_model, bias=False)
        with torch.no_grad():
            (self.dt_proj.bias if config.selective else self.dt_bias).copy_(_init_dt_bias(d))

    def ssm_parameters(self, x: torch.Tensor):
        """(Δ (B, L, D), B (B, L, N), C (B, L, N)) for the conv output x (B, L, D): the selection."""
        if not self.config.selective:
            shape = (x.shape[0], x.shape[1])
            return (F.softplus(self.dt_bias).expand(*shape, -1), self.B.expand(*shape, -1), self.C.expand(*shape, -1))
        dt, B, C = self.x_proj(x).split([self.config.dt_rank, self.config.d_state, self.config.d_state], dim=-1)
        return F.softplus(self.dt_proj(dt)), B, C

    def conv(self, x: torch.Tensor, state: MambaLayerState | None) -> torch.Tensor:
        """Causal depthwise conv over time of x (B, D, L); continues from and updates `state`."""
        k = self.config.d_conv
        if state is None:
            return self.conv1d(x)[..., : x.shape[-1]]
        x = torch.cat([state.conv, x], -1)
        state.conv = x[..., x.shape[-1] - (k - 1):]
        return F.conv1d(x, self.conv1d.weight, self.conv1d.bias, groups=x.shape[1])

    def ssm_input(self, hidden: torch.Tensor, state: MambaLayerState | None = None):
        """(x, z), both (B, L, D): the SSM's input SiLU(conv(W_x h)) and the gate's W_z h."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        return F.silu(self.conv(x.transpose(1, 2), state).transpose(1, 2)), z

    def forward(self, hidden: torch.Tensor, state: MambaLayerState | None = None) -> torch.Tensor:
        """(B, L, d_model) -> (B, L, d_model): conv, selective scan, gate, project out. Shown in chapter 8."""
        x, z = self.ssm_input(hidden, state)
        delta, B, C = self.ssm_parameters(x)
        A = -torch.exp(self.A_log.float())  # (D, N)
        h0 = None if state is None else state.ssm
        if x.shape[1] == 1 and state is not None:  # generation: one recurrent step, no scan
            y, h = selective_scan_step(h0, x[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], self.D)
            y = (y * F.silu(z[:, 0]))[:, None]
        else:
            y, h = selective_scan(x, delta, A, B, C, self.D, z, h0=h0, method=self.config.scan)
        if state is not None:
            state.ssm = h
        return self.out_proj(y)

    def new_state(self, batch: int, device=None, dtype=torch.float32) -> MambaLayerState:
        c = self.config
        return MambaLayerState(torch.zeros(batch, c.d_inner, c.d_conv - 1, device=device, dtype=dtype),
                               torch.zeros(batch, c.d_inner, c.d_state, device=device, dtype=dtype))


class MambaBlock(nn.Module):
    """Pre-norm residual layer: h = x + Mixer(RMSNorm(x))."""

    def __init__(self, config: MambaConfig, layer: int):
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = MambaMixer(config, layer)

    def forward(self, x, state: MambaLayerState | None = None):
        return x + self.mixer(self.norm(x), state)


class MambaBackbone(nn.Module):
    def __init__(self, config: MambaConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embeddings.weight, std=0.1)  # HF Mamba's initializer_range: logits start near 0
        self.layers = nn.ModuleList(MambaBlock(config, i) for i in range(config.n_layers))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)


class MambaLM(nn.Module):
    """A Mamba language model: embeddings, Mamba blocks, RMSNorm, LM head (HF MambaForCausalLM names).

    `forward(input_ids (B, L), state=None) -> logits (B, L, vocab)`; with a `MambaState` it
    continues from it, so prefill then one token at a time equals one forward over everything.
    """

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        self.backbone = MambaBackbone(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    def set_scan(self, method: str) -> None:
        """Compute every layer's scan with `method` (one of SCANS)."""
        if method not in SCANS:
            raise ValueError(f"method must be one of {SCANS}, got {method!r}")
        self.config.scan = method

    def forward(self, input_ids: torch.Tensor, state: MambaState | None = None) -> torch.Tensor:
        check_token_ids(input_ids, self.config.vocab_size)
        x = self.backbone.embeddings(input_ids)
        for i, block in enumerate(self.backbone.layers):
            layer_state = None
            if state is not None:
                if i not in state.layers:
                    state.layers[i] = block.mixer.new_state(x.shape[0], x.device, x.dtype)
                layer_state = state.layers[i]
            x = block(x, layer_state)
        if state is not None:
            state.seen += input_ids.shape[1]
        return self.lm_head(self.backbone.norm_f(x))

    @torch.no_grad()
    def step_sizes(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Δ of every layer, token and channel: (n_layers, B, L, d_inner). Large Δ: reset the state
        and take in this token; small Δ: keep the state and ignore it."""
        check_token_ids(input_ids, self.config.vocab_size)
        x = self.backbone.embeddings(input_ids)
        deltas = []
        for block in self.backbone.layers:
            deltas.append(block.mixer.ssm_parameters(block.mixer.ssm_input(block.norm(x))[0])[0])
            x = block(x)
        return torch.stack(deltas)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, state: MambaState | None = None):
        """Greedy decoding, one recurrent step per token: (B, L) prompt -> (B, max_new_tokens)."""
        state = MambaState() if state is None else state
        return greedy_decode(lambda ids: self(ids, state), input_ids, max_new_tokens)


def mamba_state_bytes(config: MambaConfig, batch: int = 1, bytes_per_element: int = 4) -> int:
    """Bytes of a MambaState: n_layers · d_inner · (d_state + d_conv - 1) numbers, whatever the context."""
    return config.n_layers * config.d_inner * (config.d_state + config.d_conv - 1) * batch * bytes_per_element
