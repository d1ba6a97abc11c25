"""Parameter and FLOP counts."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mtfm.model import MTFM, count_flops, count_parameters
from mtfm.model.testing import random_batch, tiny_config, tiny_schema

SCHEMA = tiny_schema()
# Every user has the same token counts, so the jagged backend computes no padding.
UNIFORM = {"orders": [4] * 3, "clicks": [2] * 3, "recent": [3] * 3, "feed": [2] * 3, "food": [1] * 3, "coupon": [2] * 3}


@pytest.mark.parametrize("hta", ["(1:1)x2", "(2:0)x1", "(0:2)x1"])
@pytest.mark.parametrize("hg", [(2, 1), (4, 2)])
def test_flop_count_equals_torch_flop_counter_on_a_padding_free_batch(hta, hg):
    model = MTFM(SCHEMA, tiny_config(num_heads=hg[0], num_kv_groups=hg[1], relative_time_bias=True).with_hta(hta)).eval()
    batch = random_batch(SCHEMA, 3, seed=0, lengths=UNIFORM)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(batch)
    counts = count_flops(model, batch)
    assert counts["total"] == counter.get_total_flops()
    assert counts["train_estimate"] == 3 * counts["total"]
    assert counts["total"] == sum(v for k, v in counts.items() if k not in ("total", "train_estimate"))


def test_target_attention_costs_less_than_full_attention_and_scales_with_targets():
    model = MTFM(SCHEMA, tiny_config(prune_last_full_layer=False).with_hta("(1:1)x1")).eval()
    lengths = dict(UNIFORM, orders=[40] * 3, clicks=[40] * 3)
    counts = count_flops(model, random_batch(SCHEMA, 3, seed=0, lengths=lengths))
    tokens = 3 * sum(v[0] for v in lengths.values())
    targets = 3 * (2 + 1 + 2)
    ctx = tokens - targets
    pair = 4 * model.config.dim_per_head * model.config.num_heads
    assert counts["full_attn"] == (3 * (tokens // 3) * (ctx // 3) + targets) * pair
    assert counts["target_attn"] == (3 * (targets // 3) * (ctx // 3) + targets) * pair
    assert counts["target_attn"] < counts["full_attn"] / 10


def test_parameter_counts_by_component_add_up_to_the_model():
    model = MTFM(SCHEMA, tiny_config())
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["dense"] == counts["total"] - counts["embedding_tables"]
    assert counts["full_layers"] > 0 and counts["target_layers"] > 0 and counts["head"] > 0
    sub = model.scenario_subgraph("food")
    assert count_parameters(sub)["total"] < counts["total"]
