"""Layer counts per stage for every --partition_method, and the errors for impossible splits."""

import pytest

from merak_lora.config import ConfigError
from merak_lora.partition import layer_ranges, split_layers


def test_uniform_puts_extra_layers_first():
    assert split_layers(10, 4, "uniform") == [3, 3, 2, 2]
    assert split_layers(8, 4, "uniform") == [2, 2, 2, 2]


def test_uniform_floor_puts_extra_layers_last():
    assert split_layers(10, 4, "uniform_floor") == [2, 2, 3, 3]


def test_explicit_list():
    assert split_layers(10, 3, "4,3,3") == [4, 3, 3]
    assert layer_ranges([4, 3, 3]) == [(0, 4), (4, 7), (7, 10)]


def test_parameters_balances_embeddings_and_head():
    # 8 equal layers of weight 10; embeddings weigh 20 (two layers), head 30 (three layers).
    counts = split_layers(8, 3, "parameters", [10] * 8, pre_params=20, post_params=30)
    loads = [c * 10 for c in counts]
    loads[0] += 20
    loads[-1] += 30
    assert sum(counts) == 8 and all(c >= 1 for c in counts)
    assert max(loads) == 50  # optimal: keeping stage 0 and 2 at 40 would leave 50 for stage 1
    assert counts[-1] <= min(counts[:-1]), "the stage holding the head should get the fewest layers"


def test_parameters_without_extras_is_even():
    assert split_layers(9, 3, "parameters", [5] * 9) == [3, 3, 3]


@pytest.mark.parametrize("args,message", [
    ((4, 5, "uniform"), "only 4 decoder layers"),
    ((10, 3, "4,4,4"), "sums to 12 layers but the model has 10"),
    ((10, 3, "5,5"), "lists 2 stages but the pipeline has 3"),
    ((10, 3, "5,5,0"), "at least one decoder layer"),
])
def test_impossible_splits_say_how_to_fix(args, message):
    with pytest.raises(ConfigError, match=message):
        split_layers(*args)


def test_parameters_counts_the_head_but_not_the_embedding_lookup(tiny_llama):
    """Tiny Llama: a layer holds ~37k weights, the untied head and the embeddings 65k each. Counting only the
    head, the last stage (1 layer + head ~ 2.8 layers of work) balances 3 layers; counting the embeddings too
    would have split 2/2 and left the last stage the slowest."""
    import torch

    from merak_lora.models import find_parts
    from merak_lora.stage import build_skeleton, load_model_config, plan_stages
    config = load_model_config(tiny_llama, False)
    lm = build_skeleton(config, torch.float32, False, "sdpa")
    parts = find_parts(lm, config)
    specs = plan_stages(lm, parts, 2, "parameters")
    assert [(s.start, s.stop) for s in specs] == [(0, 3), (3, 4)]
