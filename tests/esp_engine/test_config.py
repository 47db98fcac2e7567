"""Bad settings fail early with a clear exception type and message."""

import pytest

from esp_engine.config import SamplingParams, SpecConfig
from esp_engine.errors import InvalidRequestError, InvalidSpecConfigError


def test_unknown_method_and_preset():
    with pytest.raises(InvalidSpecConfigError, match="unknown speculative method 'medusa'"):
        SpecConfig.from_preset("medusa", "bc30")
    with pytest.raises(InvalidSpecConfigError, match="unknown preset 'bc99'"):
        SpecConfig.from_preset("esp", "bc99")


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_masks=2, tree=(4,)), "one width per mask"),
    (dict(num_masks=1, tree=(0,)), "tree widths"),
    (dict(num_masks=4, tree=(1, 1, 1, 1)), "num_masks"),
    (dict(ema_lambda=1.5), "ema_lambda"),
])
def test_invalid_tree_shapes(kwargs, message):
    with pytest.raises(InvalidSpecConfigError, match=message):
        SpecConfig(method="esp", **kwargs)


def test_overrides_are_checked():
    spec = SpecConfig.from_preset("esp", "bc30").with_overrides(tree=[10])
    assert spec.tree == (10,)
    with pytest.raises(InvalidSpecConfigError, match="unknown speculative setting"):
        spec.with_overrides(depth=3)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=-1), dict(top_k=-5),
                                    dict(logprobs=21), dict(prompt_logprobs=-1)])
def test_invalid_sampling(kwargs):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kwargs)
