"""Quest (Tang et al. 2024): keep every token, read only the pages a query needs.

The cache is cut into pages of `page_size` tokens; per page and KV head it keeps the channel-wise
minimum and maximum of the (rotated) keys. For a query q the score of any key k on the page is
bounded by (Quest, §3.2):

    q·k = Σ_i q_i k_i  <=  Σ_i max(q_i · min_i, q_i · max_i)        (each term: k_i lies in [min_i, max_i])

A decoding query reads only its top `pages` pages by this bound (and the page holding itself):
nothing is evicted, so a token ignored now can be read again later, which eviction cannot do.
The bytes held stay those of the full cache; the bytes READ per step shrink to the selected
pages plus the min/max metadata.
"""

import torch

from .attention import causal_mask, repeat_kv
from .kv import KVCache, _check_int


def page_bounds(q: torch.Tensor, k: torch.Tensor, page_size: int) -> torch.Tensor:
    """(B, H, n, P) Quest's upper bound Σ_i max(q_i·min_i, q_i·max_i) of each query's score on each page.

    q (B, H, n, D) rotated queries; k (B, H_kv, N, D) rotated keys, cut into P = ceil(N / page_size)
    pages (the last may be partial). Without the softmax scale.
    """
    _check_int("page_size", page_size, 1)
    B, H_kv, N, D = k.shape
    P = -(-N // page_size)
    padded = torch.nn.functional.pad(k.float(), (0, 0, 0, P * page_size - N), value=float("nan"))
    pages = padded.view(B, H_kv, P, page_size, D)
    kmin, kmax = pages.nan_to_num(float("inf")).amin(3), pages.nan_to_num(float("-inf")).amax(3)  # (B, H_kv, P, D)
    kmin, kmax = repeat_kv(kmin, q.shape[1] // H_kv), repeat_kv(kmax, q.shape[1] // H_kv)
    qf = q.float()[:, :, :, None, :]  # (B, H, n, 1, D)
    return torch.maximum(qf * kmin[:, :, None], qf * kmax[:, :, None]).sum(-1)


def page_selection(q: torch.Tensor, k: torch.Tensor, pages: int, page_size: int) -> torch.Tensor:
    """(B, H, n, N) bool: the keys each query reads, its top `pages` pages by `page_bounds` among the pages
    it may see (end-aligned causal), always including the page that holds the query itself."""
    _check_int("pages", pages, 1)
    n, N = q.shape[2], k.shape[2]
    bounds = page_bounds(q, k, page_size)  # (B, H, n, P)
    P = bounds.shape[-1]
    last_key = torch.arange(N - n, N, device=q.device)  # the last key each query sees
    own_page = last_key // page_size  # (n,)
    page = torch.arange(P, device=q.device)
    bounds = bounds.masked_fill(page > own_page[:, None], float("-inf"))  # pages wholly in the future
    bounds = bounds.masked_fill(page == own_page[:, None], float("inf"))
    top = bounds.topk(min(pages, P), dim=-1).indices  # (B, H, n, pages)
    chosen = torch.zeros_like(bounds, dtype=torch.bool).scatter_(-1, top, True)
    return chosen.repeat_interleave(page_size, dim=-1)[..., :N] & causal_mask(n, N, q.device)


class QuestCache(KVCache):
    """Quest (Tang et al. 2024): every token held; each query after the prompt attends to its top
    `pages` pages of `page_size` tokens by the bound of `page_bounds` (the prompt attends in full).

    `read_bytes[layer]`: bytes of keys and values one query of the layer's last attention read, on
    average (per KV head, the union of the pages its query heads chose), plus the pages' min/max.
    """

    def __init__(self, pages: int, *, page_size: int = 16, positions: str = "text"):
        _check_int("pages", pages, 1)
        _check_int("page_size", page_size, 1)
        super().__init__(positions=positions)
        self.pages, self.page_size = pages, page_size
        self.read_bytes: dict[int, int] = {}
        self._prompt_read: set[int] = set()

    def attention(self, layer, q, k, v, *, causal, scale, attn_fn):
        element = k.element_size()
        if layer not in self._prompt_read:  # the prompt: full attention, as in the paper
            self._prompt_read.add(layer)
            self.read_bytes[layer] = 2 * k.numel() * element
            return attn_fn(q, k, v, causal=causal, scale=scale)
        chosen = page_selection(q, k, self.pages, self.page_size)  # (B, H, n, N)
        n_rep = q.shape[1] // k.shape[1]
        s = (q.float() @ repeat_kv(k, n_rep).float().transpose(-1, -2)) * scale
        p = torch.softmax(s.masked_fill(~chosen, float("-inf")), dim=-1)
        out = (p @ repeat_kv(v, n_rep).float()).to(q.dtype)
        B, H_kv, N, D = k.shape
        # per decoding query: the union of the pages its group's query heads chose, per KV head
        tokens_read = chosen.view(B, H_kv, n_rep, q.shape[2], N).any(2).sum() / q.shape[2]
        metadata = 2 * B * H_kv * (-(-N // self.page_size)) * D
        self.read_bytes[layer] = int((2 * tokens_read * D + metadata) * element)
        return out

    def bytes_read(self) -> int:
        """Bytes read by the last step's attention, all layers."""
        return sum(self.read_bytes.values())


def top_key_recall(chosen: torch.Tensor, q: torch.Tensor, k: torch.Tensor, top_k: int) -> float:
    """Share of each query's true top-`top_k` keys (by q·k, per query head, among the keys it may see)
    that the selection `chosen` (B, H, n, N) bool contains; the mean over queries and heads.

    q (B, H, n, D) are the last n of the N keys k (B, H_kv, N, D). Any block selection can be
    judged this way: Quest's pages here, MoBA's routed blocks in `lectlib.sparse.moba_recall`.
    """
    _check_int("top_k", top_k, 1)
    n, N = q.shape[2], k.shape[2]
    if chosen.shape != (*q.shape[:3], N):
        raise ValueError(f"chosen must be (B, H, n, N) = {(*q.shape[:3], N)}, got {tuple(chosen.shape)}")
    scores = (q.float() @ repeat_kv(k, q.shape[1] // k.shape[1]).float().transpose(-1, -2))
    scores = scores.masked_fill(~causal_mask(n, N, q.device), float("-inf"))
    top = scores.topk(min(top_k, N - n + 1), dim=-1).indices  # within what the first query may see
    return chosen.gather(-1, top).float().mean().item()


def topk_recall(q: torch.Tensor, k: torch.Tensor, pages: int, page_size: int, top_k: int) -> float:
    """Share of each query's true top-`top_k` keys that its Quest pages contain (`top_key_recall` of
    `page_selection`). q (B, H, n, D) are the last n of the N keys k (B, H_kv, N, D)."""
    return top_key_recall(page_selection(q, k, pages, page_size), q, k, top_k)
