"""Settings as data: which speculative method runs, and how a request samples.

`SpecConfig.from_preset(method, preset)` gives the settings the ESP paper reports for a
block complexity (BC, tokens per forward pass) of 10, 30 or 60; every field can be
overridden afterwards with `dataclasses.replace` or `SpecConfig.with_overrides`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequestError, InvalidSpecConfigError

# Paper settings (docs/ESP.md): ESP k=1 [4] / k=1 [14] / k=2 [15,4]; LADE (level, window, guess)
# = (3,4,1) / (4,5,5) / (5,8,7). PLD and hybrid are sized to the same BC.
_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "esp": {
        "bc10": dict(num_masks=1, tree=(4,)),
        "bc30": dict(num_masks=1, tree=(14,)),
        "bc60": dict(num_masks=2, tree=(15, 4)),
        "bc60-k1": dict(num_masks=1, tree=(29,)),
        "bc30-dynamic": dict(num_masks=1, tree=None, node_budget=14),
        # Width picked every step for the best tokens/s on this machine (cost_model.py), up to BC 30.
        "auto": dict(num_masks=1, tree=None, node_budget=14, adaptive=True),
        "bc60-dynamic": dict(num_masks=2, tree=None, node_budget=19),
    },
    "pld": {
        "bc10": dict(pld_num_drafts=9, pld_num_candidates=1),
        "bc30": dict(pld_num_drafts=10, pld_num_candidates=2),
        "bc60": dict(pld_num_drafts=10, pld_num_candidates=5),
    },
    "lade": {
        "bc10": dict(lade_level=3, lade_window=4, lade_guess=1),
        "bc30": dict(lade_level=4, lade_window=5, lade_guess=5),
        "bc60": dict(lade_level=5, lade_window=8, lade_guess=7),
    },
    "hybrid": {
        "bc10": dict(num_masks=1, tree=None, node_budget=4, pld_num_drafts=3, hybrid_min_esp_nodes=1),
        "bc30": dict(num_masks=1, tree=None, node_budget=14, pld_num_drafts=10, hybrid_min_esp_nodes=4),
        "bc60": dict(num_masks=1, tree=None, node_budget=29, pld_num_drafts=10, pld_num_candidates=2,
                     hybrid_min_esp_nodes=9),
    },
}

MAX_LOGPROBS = 20  # alternatives per token at most, as in the OpenAI API
METHODS = ("ar", *_PRESETS)  # "ar" is plain decoding: no presets
# Weight-only quantization of the linears at load (esp_engine/quantization.py); here, without torch, for CLIs.
QUANTIZATION_METHODS = ("none", "int8", "int4", "w8a8")
PRESETS = ("bc10", "bc30", "bc60")


@dataclass(frozen=True, slots=True)
class SpecConfig:
    """How one sequence speculates. `method="ar"` means plain decoding."""

    method: str = "esp"
    # ESP (also the ESP half of "hybrid").
    num_masks: int = 1  # k: mask slots carried by every real token of the block
    tree: tuple[int, ...] | None = (14,)  # static [K_1..K_k]; None selects the dynamic tree
    node_budget: int | None = None  # dynamic tree: N draft nodes; default BC/(k+1)-1 of the preset
    ema_lambda: float = 0.1  # lam of the mask-embedding update
    adaptive: bool = False  # choose the tree width each step from measured cost and acceptance (k=1)
    # PLD (also the PLD half of "hybrid").
    pld_max_ngram: int = 3
    pld_min_ngram: int = 1
    pld_num_drafts: int = 10  # longest chain one match may draft
    pld_num_candidates: int = 1  # distinct earlier matches merged into one tree
    # LADE.
    lade_level: int = 4  # N of the n-grams
    lade_window: int = 5  # W: Jacobi lanes
    lade_guess: int = 5  # G: pool n-grams verified per step
    # Hybrid: ESP keeps at least this many of the node budget when a PLD chain is drafted.
    hybrid_min_esp_nodes: int = 4

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidSpecConfigError(
                f"unknown speculative method {self.method!r}; choose one of {', '.join(METHODS)}"
            )
        if not 1 <= self.num_masks <= 3:
            raise InvalidSpecConfigError(f"num_masks must be 1, 2 or 3, got {self.num_masks}")
        if self.tree is not None:
            if len(self.tree) != self.num_masks:
                raise InvalidSpecConfigError(
                    f"a static tree needs one width per mask (num_masks={self.num_masks}), got {list(self.tree)}"
                )
            if any((not isinstance(w, int)) or w < 1 or w > 256 for w in self.tree):
                raise InvalidSpecConfigError(f"tree widths must be integers in 1..256, got {list(self.tree)}")
        if self.adaptive and (self.num_masks != 1 or self.method not in ("esp", "hybrid")):
            raise InvalidSpecConfigError("adaptive tree widths need method esp or hybrid with num_masks=1")
        if self.node_budget is not None and not 1 <= self.node_budget <= 512:
            raise InvalidSpecConfigError(f"node_budget must be in 1..512, got {self.node_budget}")
        if not 0.0 <= self.ema_lambda <= 1.0:
            raise InvalidSpecConfigError(f"ema_lambda must be in [0, 1], got {self.ema_lambda}")
        if not 1 <= self.pld_min_ngram <= self.pld_max_ngram <= 16:
            raise InvalidSpecConfigError("PLD n-gram sizes must satisfy 1 <= min <= max <= 16")
        if not 1 <= self.pld_num_drafts <= 64 or not 1 <= self.pld_num_candidates <= 8:
            raise InvalidSpecConfigError("pld_num_drafts must be in 1..64 and pld_num_candidates in 1..8")
        if not 2 <= self.lade_level <= 8 or not 1 <= self.lade_window <= 32 or not 0 <= self.lade_guess <= 32:
            raise InvalidSpecConfigError("LADE needs level in 2..8, window in 1..32 and guess in 0..32")
        if self.hybrid_min_esp_nodes < 0:
            raise InvalidSpecConfigError("hybrid_min_esp_nodes must be >= 0")

    @property
    def is_speculative(self) -> bool:
        return self.method != "ar"

    @property
    def esp_node_budget(self) -> int:
        """Draft nodes of the ESP tree: sum of the static widths, or the dynamic budget."""
        if self.tree is not None:
            return sum(self.tree)
        return self.node_budget if self.node_budget is not None else 14

    @property
    def block_complexity(self) -> int:
        """Tokens one decode pass carries (the paper's BC); each method's proposer knows its own."""
        from .proposers import proposer_class  # the proposers import this module

        return proposer_class(self.method).block_rows(self)

    @classmethod
    def from_preset(cls, method: str, preset: str | None = None) -> "SpecConfig":
        """Settings for `method` at block complexity `preset` ("bc10", "bc30", "bc60")."""
        if method not in METHODS:
            raise InvalidSpecConfigError(
                f"unknown speculative method {method!r}; choose one of {', '.join(METHODS)}"
            )
        if method == "ar":
            return cls(method="ar")
        preset = preset or "bc30"
        table = _PRESETS.get(method, {})
        if preset not in table:
            raise InvalidSpecConfigError(
                f"unknown preset {preset!r} for method {method!r}; choose one of {', '.join(sorted(table))}"
            )
        return cls(method=method, **table[preset])

    def with_overrides(self, **overrides: Any) -> "SpecConfig":
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InvalidSpecConfigError(f"unknown speculative setting(s): {', '.join(unknown)}")
        if "tree" in overrides and overrides["tree"] is not None:
            overrides["tree"] = tuple(overrides["tree"])
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tree"] = list(self.tree) if self.tree is not None else None
        d["block_complexity"] = self.block_complexity
        return d


def preset_names(method: str) -> list[str]:
    return sorted(_PRESETS.get(method, {}))


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How tokens are chosen and when generation stops. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k filter
    seed: int | None = None
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N alternatives per committed token; 0 = only the chosen one
    # Top-N alternatives per prompt token (scoring, `echo`), computed in the prefill pass; None: not asked.
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        # The one place sampling values are range-checked; the server passes requests' values as they
        # come and reports these errors as 400s naming `param`. Comparisons are written so NaN fails.
        if not (0.0 <= self.temperature <= 2.0):
            raise InvalidRequestError(f"temperature must be between 0 and 2, got {self.temperature}", "temperature")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1, 0 or positive, got {self.top_k}", "top_k")
        if self.max_new_tokens < 0:
            raise InvalidRequestError(f"max_tokens must be 0 (score the prompt only) or more, got {self.max_new_tokens}",
                                      "max_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}", "logprobs")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}, got {self.prompt_logprobs}",
                                      "prompt_logprobs")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
