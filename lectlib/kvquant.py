"""Fewer bits per cached number: KIVI's quantized KV cache, and what makes keys hard to quantize.

Asymmetric min-max quantization of a group x_1..x_G to b bits (KIVI, Liu et al. 2024, eq. 2):

    s = (max - min) / (2^b - 1),   code_i = round((x_i - min) / s),   x̂_i = code_i · s + min

so |x_i - x̂_i| <= s / 2. The error is set by the group's RANGE: one outlier widens it for all.
SmolLM2's keys, like Llama's, have a few channels with large magnitudes in every token, so KIVI
groups keys PER CHANNEL (a group = one channel over G tokens: the outlier channel gets its own
range) and values PER TOKEN (values have no such channels, and a token's output error then stays
its own). Two exact rewrites shrink the key ranges before quantizing (both leave q·k unchanged in
full precision): SmoothAttention (scale key channel i down by λ_i and the query's up by λ_i) and a
Hadamard rotation (q·k = (qH)·(kH) for orthogonal H, which spreads an outlier over all channels).
"""

import math

import torch

from .kv import KVCache, _check_int

BITS = (2, 4, 8)


def _check_bits(bits) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")


def quantize(x: torch.Tensor, bits: int, dim: int):
    """(codes uint8, scale, minimum): x quantized to `bits` with one range per slice along `dim` (the group).

    scale and minimum keep `dim` with size 1; codes has x's shape, values in [0, 2^bits - 1].
    """
    _check_bits(bits)
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(torch.finfo(torch.float32).tiny)
    codes = ((x - lo) / scale).round().clamp(0, 2 ** bits - 1).to(torch.uint8)
    return codes, scale, lo


def dequantize(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """x̂ = code · scale + minimum, in scale's dtype."""
    return codes.to(scale.dtype) * scale + minimum


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., M) of `bits` each -> (..., M·bits/8) bytes; M must be a multiple of 8/bits."""
    _check_bits(bits)
    per = 8 // bits
    if codes.shape[-1] % per:
        raise ValueError(f"codes' last dim {codes.shape[-1]} must be a multiple of {per} to pack {bits}-bit codes")
    grouped = codes.view(*codes.shape[:-1], -1, per).to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (grouped << shifts).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack`: bytes (..., M·bits/8) -> uint8 codes (..., M)."""
    _check_bits(bits)
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32)[..., None] >> shifts) & (2 ** bits - 1)
    return codes.view(*packed.shape[:-1], -1).to(torch.uint8)


def fake_quantize(x: torch.Tensor, bits: int, *, axis: str, group_size: int) -> torch.Tensor:
    """x (B, H, N, D) quantized and dequantized: axis="channel" groups `group_size` tokens per channel
    (KIVI's keys), axis="token" groups `group_size` channels per token (KIVI's values). N (channel)
    or D (token) must be a multiple of group_size."""
    _check_int("group_size", group_size, 1)
    B, H, N, D = x.shape
    if axis == "channel":
        if N % group_size:
            raise ValueError(f"group_size {group_size} must divide the {N} tokens for per-channel groups")
        codes, scale, lo = quantize(x.view(B, H, N // group_size, group_size, D), bits, dim=3)
    elif axis == "token":
        if D % group_size:
            raise ValueError(f"group_size {group_size} must divide head_dim {D} for per-token groups")
        codes, scale, lo = quantize(x.view(B, H, N, D // group_size, group_size), bits, dim=4)
    else:
        raise ValueError(f"axis must be 'channel' or 'token', got {axis!r}")
    return dequantize(codes, scale, lo).view(B, H, N, D)


def channel_magnitudes(x: torch.Tensor) -> torch.Tensor:
    """(D,) mean |x| per channel of x (B, H, N, D) over batch, heads and tokens: outlier channels stand out."""
    return x.abs().float().mean(dim=(0, 1, 2))


def smooth_scales(q: torch.Tensor, k: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """(H_kv, 1, D) SmoothAttention's λ_i = max|k_i|^α / max|q_i|^(1-α) per KV head and channel (SmoothQuant's rule,
    Xiao et al. 2023, eq. 4, applied to q·k): k/λ and q·λ give the same scores and flatter keys."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    n_rep = q.shape[1] // k.shape[1]
    qmax = q.abs().amax(dim=(0, 2)).view(k.shape[1], n_rep, -1).amax(1)  # (H_kv, D): over the group's queries
    kmax = k.abs().amax(dim=(0, 2))
    return (kmax.clamp_min(1e-5) ** alpha / qmax.clamp_min(1e-5) ** (1 - alpha))[:, None, :]


def hadamard(d: int, *, dtype=torch.float32) -> torch.Tensor:
    """(d, d) orthonormal Hadamard matrix (Sylvester's construction), d a power of two: H Hᵀ = I."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"d must be a power of two, got {d}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(d)


class QuantizedCache(KVCache):
    """KIVI (Liu et al. 2024, Alg. 1): keys quantized per channel in groups of `group_size` tokens, values
    per token in groups of `group_size` channels, to `bits` bits, packed into bytes; the newest tokens
    stay in full precision (at most `residual` + group_size - 1 of them, whole groups move out).
    Scales and minimums are stored in fp16. Every read dequantizes (what attention sees is x̂)."""

    def __init__(self, bits: int = 2, *, group_size: int = 32, residual: int = 32, positions: str = "text"):
        _check_bits(bits)
        _check_int("group_size", group_size, 1)
        _check_int("residual", residual, 0)
        super().__init__(positions=positions)
        self.bits, self.group_size, self.residual = bits, group_size, residual
        self.packed: dict[int, dict[str, torch.Tensor]] = {}  # layer -> packed codes, scales, minimums

    def __len__(self) -> int:
        return 0 if 0 not in self.text_positions else self.text_positions[0].shape[0]

    def _dequantized(self, layer: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H_kv, T, D) keys and values of the quantized part, read back."""
        s, G = self.packed[layer], self.group_size
        B, H, T = s["kc"].shape[:3]
        keys = dequantize(unpack(s["kc"], self.bits).view(B, H, T // G, G, -1), s["ks"].float(), s["km"].float())
        values = dequantize(unpack(s["vc"], self.bits).view(B, H, T, -1, G), s["vs"].float(), s["vm"].float())
        return keys.view(B, H, T, -1).to(dtype), values.view(B, H, T, -1).to(dtype)

    def update(self, layer, k, v, positions):
        self._check_update(layer, k, v, positions)
        if k.shape[-1] % self.group_size:
            raise ValueError(f"group_size {self.group_size} must divide head_dim {k.shape[-1]} (values are grouped per token)")
        # the full-precision part (self.keys/values) takes the new tokens; attention sees x̂ then them
        out = super().update(layer, k, v, positions)
        if layer in self.packed:
            old_k, old_v = self._dequantized(layer, k.dtype)
            out = (torch.cat([old_k, out[0]], 2), torch.cat([old_v, out[1]], 2), *out[2:])
        self._quantize_oldest(layer)
        return out

    def _quantize_oldest(self, layer: int) -> None:
        """Move whole groups of the oldest full-precision tokens beyond `residual` into packed storage."""
        keys, values, G = self.keys[layer], self.values[layer], self.group_size
        B, H, R, D = keys.shape
        n_move = (R - self.residual) // G * G if R > self.residual else 0
        if n_move == 0:
            return
        kc, ks, km = quantize(keys[:, :, :n_move].float().view(B, H, n_move // G, G, D), self.bits, dim=3)
        vc, vs, vm = quantize(values[:, :, :n_move].float().view(B, H, n_move, D // G, G), self.bits, dim=4)
        new = {"kc": pack(kc.view(B, H, n_move, D), self.bits), "ks": ks.half(), "km": km.half(),
               "vc": pack(vc.view(B, H, n_move, D), self.bits), "vs": vs.half(), "vm": vm.half()}
        if layer in self.packed:
            new = {name: torch.cat([self.packed[layer][name], t], dim=2) for name, t in new.items()}
        self.packed[layer] = new
        self.keys[layer], self.values[layer] = keys[:, :, n_move:], values[:, :, n_move:]

    def nbytes(self) -> int:
        """Bytes held: packed codes, fp16 scales and minimums, and the full-precision residual."""
        packed = sum(t.numel() * t.element_size() for s in self.packed.values() for t in s.values())
        return packed + super().nbytes()


SCHEMES = ("per-token", "per-channel", "per-token + smooth", "per-channel + smooth",
           "per-token + Hadamard", "per-channel + Hadamard")


def attention_output_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bits: int, scheme: str, *,
                           group_size: int = 32) -> float:
    """‖o(q, k̂, v) - o(q, k, v)‖ / ‖o(q, k, v)‖ with the keys quantized by `scheme` (values exact).

    q (B, H, N, D), k, v (B, H_kv, N, D), rotated as attention multiplies them (both rewrites are
    exact there); per-token groups are the whole head dim, per-channel groups `group_size` tokens.
    """
    from .attention import sdpa_attention

    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    q, k, v = q.float(), k.float(), v.float()
    exact = sdpa_attention(q, k, v, causal=True)
    if "smooth" in scheme:
        lam = smooth_scales(q, k)
        q, k = q * lam.repeat_interleave(q.shape[1] // k.shape[1], 0), k / lam
    elif "Hadamard" in scheme:
        h = hadamard(q.shape[-1])
        q, k = q @ h, k @ h
    if scheme.startswith("per-token"):
        k_hat = fake_quantize(k, bits, axis="token", group_size=k.shape[-1])
    else:
        keep = k.shape[2] // group_size * group_size
        k_hat = torch.cat([fake_quantize(k[:, :, :keep], bits, axis="channel", group_size=group_size), k[:, :, keep:]], 2)
    got = sdpa_attention(q, k_hat, v, causal=True, scale=1 / math.sqrt(q.shape[-1]))
    return ((got - exact).norm() / exact.norm()).item()
