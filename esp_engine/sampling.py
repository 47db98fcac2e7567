"""Choosing a token from the target distribution, one uniform draw per committed token.

Every committed token, whatever the method, is chosen by `TokenChooser.choose` from the
model's logits for that exact prefix, and each choice consumes the next uniform of one
seeded stream. So a seeded request yields the same tokens under `ar`, `esp`, `pld`, ...:
speculation changes how many forward passes it takes, never what is drawn.
"""

from __future__ import annotations

import os

import torch

from .config import SamplingParams


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [..., V] after temperature, top-k and top-p (renormalised)."""
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (the token crossing it included).
        drop_sorted = (cumulative - sorted_probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


class TokenChooser:
    """Greedy argmax, or inverse-CDF sampling driven by a seeded stream of uniforms."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.is_greedy:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            self.generator = torch.Generator().manual_seed(seed)

    @property
    def is_greedy(self) -> bool:
        return self.generator is None

    def choose(self, logits: torch.Tensor) -> int:
        """Pick the token for one row of logits [V]."""
        if self.generator is None:
            return int(torch.argmax(logits))
        probs = process_logits(logits, self.params)
        u = torch.rand((), generator=self.generator, dtype=torch.float64).item()
        cdf = probs.double().cumsum(-1)
        index = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=torch.float64)))
        index = min(index, probs.shape[-1] - 1)
        while probs[index] == 0 and index > 0:  # never land on a filtered token at a cdf plateau
            index -= 1
        return index


def token_logprobs(logits: torch.Tensor, token_ids: list[int], top_n: int, with_rank: bool = False) -> list[dict]:
    """Log-probabilities of the chosen tokens under the raw model distribution, with the top-N
    (and, `with_rank`, each token's rank in the vocabulary: 1 for the most likely)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp[torch.arange(len(token_ids)), torch.tensor(token_ids, dtype=torch.long)]
    ranks = (logp > chosen[:, None]).sum(dim=-1).add_(1).tolist() if with_rank else None
    out = []
    for row, tok in enumerate(token_ids):
        entry = {"token_id": tok, "logprob": float(chosen[row]), "top": []}
        if ranks is not None:
            entry["rank"] = ranks[row]
        if top_n > 0:
            values, ids = torch.topk(logp[row], top_n)
            entry["top"] = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist())]
        out.append(entry)
    return out
