"""Similarity initialisation and the closed self key (issue 10): what they tie, what they change at step 0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtfm.data.batch import FeatureTensors
from mtfm.model import MTFM
from mtfm.model.layers import FullAttentionLayer, TargetAttentionLayer, _initial_time_bias
from mtfm.model.testing import random_batch, tiny_config, tiny_schema


def _attention_layers(model: MTFM) -> list[TargetAttentionLayer | FullAttentionLayer]:
    return [m for m in model.stack.modules() if isinstance(m, (TargetAttentionLayer, FullAttentionLayer))]


def _uqkv(layer: TargetAttentionLayer | FullAttentionLayer) -> tuple[torch.Tensor, ...]:
    """(U, Q, K, V) weight rows of a layer."""
    width, kv = layer.heads * layer.dh, layer.kv_groups * layer.dh
    if isinstance(layer, TargetAttentionLayer):
        u, q = layer.f_uq.weight.split([width, width])
        k, v = layer.f_kv.weight.split([kv, kv])
        return u, q, k, v
    return tuple(layer.f1.weight.split([width, width, kv, kv]))


@pytest.mark.parametrize("heads,groups", [(2, 1), (4, 2)])
def test_queries_start_as_keys_and_gates_as_values_per_kv_group(heads, groups):
    torch.manual_seed(0)
    model = MTFM(tiny_schema(), tiny_config(num_heads=heads, num_kv_groups=groups, d_model=16, similarity_init=True))
    for layer in _attention_layers(model):
        u, q, k, v = _uqkv(layer)
        dh, per_group = layer.dh, heads // groups
        for h in range(heads):
            g = h // per_group
            assert torch.equal(q[h * dh : (h + 1) * dh], k[g * dh : (g + 1) * dh])
            assert torch.equal(u[h * dh : (h + 1) * dh], v[g * dh : (g + 1) * dh])
    torch.manual_seed(0)
    plain = MTFM(tiny_schema(), tiny_config(num_heads=heads, num_kv_groups=groups, d_model=16))
    u, q, k, v = _uqkv(_attention_layers(plain)[0])
    assert not torch.equal(q[: layer.dh], k[: layer.dh])  # the check above can fail
    assert plain.state_dict().keys() == model.state_dict().keys()  # initial values only: same parameters


def _direction(block: torch.Tensor) -> torch.Tensor:
    return block.flatten() / block.norm()


def test_tokenizers_start_as_one_mlp_over_shared_tables_with_zero_biases():
    torch.manual_seed(0)
    model = MTFM(tiny_schema(), tiny_config(similarity_init=True))
    emb = model.embeddings
    # R:recent = [item_id (4), tags (4)]; T:feed = user [age (4)] + cross [distance (2)] + item [item_id (4), tags (4)]
    recent, feed = model.realtime_tokenizers["recent"], model.scenario_tokenizers["feed"]
    assert emb.table_of[("R:recent", "item_id")] == emb.table_of[("T:feed:item", "item_id")]
    for r_cols, t_cols in ((slice(0, 4), slice(6, 10)), (slice(4, 8), slice(10, 14))):
        cos = torch.dot(_direction(recent[0].weight[:, r_cols]), _direction(feed[0].weight[:, t_cols]))
        assert cos > 1 - 1e-5  # one direction, scaled per tokenizer
    assert abs(torch.dot(_direction(recent[0].weight[:, 0:4]), _direction(feed[0].weight[:, 0:4]))) < 0.5  # age
    assert torch.equal(recent[-1].weight, feed[-1].weight)
    for mlp in [*model.history_tokenizers.values(), *model.realtime_tokenizers.values(), *model.scenario_tokenizers.values()]:
        for layer in mlp:
            if isinstance(layer, torch.nn.Linear):
                assert torch.count_nonzero(layer.bias) == 0


@torch.no_grad()
def test_link_features_carry_half_of_a_t_tokens_initial_variance():
    """feed's item_id and tags (tables shared with the sequences) against age and distance, which
    without balancing would be ~1/300 and ~all of it (numeric encoders output values of order 1)."""
    torch.manual_seed(0)
    model = MTFM(tiny_schema(), tiny_config(similarity_init=True, tokenizer_hidden=[256]))
    emb, first = model.embeddings, model.scenario_tokenizers["feed"][0].weight
    age_var = emb.tables[emb.table_of[("T:feed:user", "age")]].weight.var()
    item_var = emb.tables[emb.table_of[("T:feed:item", "item_id")]].weight.var()
    tags_var = emb.tables[emb.table_of[("T:feed:item", "tags")]].weight.var()
    enc = emb.numeric["T_feed_cross__distance"]
    distance_var = (enc.weight.squeeze(1) ** 2 + enc.bias**2)
    contribution = {
        "age": (first[:, 0:4] ** 2).sum(1).mean() * age_var,
        "distance": ((first[:, 4:6] ** 2) * distance_var).sum(1).mean(),
        "item_id": (first[:, 6:10] ** 2).sum(1).mean() * item_var,
        "tags": (first[:, 10:14] ** 2).sum(1).mean() * tags_var,
    }
    assert float(contribution["item_id"] + contribution["tags"]) == pytest.approx(0.5, rel=0.2)
    assert float(contribution["age"]) == pytest.approx(0.25, rel=0.25)
    assert float(contribution["distance"]) == pytest.approx(0.25, rel=0.25)


def _scores(model: MTFM, same: bool, n: int = 256) -> torch.Tensor:
    """First target layer's pre-SiLU scores of feed T-tokens against recent R-tokens with the same
    (``same``) or other item and tags."""
    g = torch.Generator().manual_seed(1)
    item = torch.randint(0, 50, (n,), generator=g)
    tags = torch.randint(0, 7, (n,), generator=g)
    r_item, r_tags = (item, tags) if same else ((item + 1 + torch.randint(0, 49, (n,), generator=g)) % 50, (tags + 3) % 7)
    offsets = torch.arange(n + 1)
    emb = model.embeddings
    t = torch.cat([
        emb.embed("T:feed:user", FeatureTensors(categorical={"age": torch.randint(0, 3, (n,), generator=g)}), n),
        emb.embed("T:feed:cross", FeatureTensors(numeric={"distance": torch.randn(n, generator=g)}), n),
        emb.embed("T:feed:item", FeatureTensors(categorical={"item_id": item}, multi={"tags": (tags, offsets)}), n),
    ], dim=1)
    r = emb.embed("R:recent", FeatureTensors(categorical={"item_id": r_item}, multi={"tags": (r_tags, offsets)}), n)
    x_t, x_r = model.scenario_tokenizers["feed"](t), model.realtime_tokenizers["recent"](r)
    layer = next(m for m in model.stack.modules() if isinstance(m, TargetAttentionLayer))
    _, q = layer.project_uq(F.layer_norm(x_t, x_t.shape[-1:]))
    k, _ = layer.project_kv(F.layer_norm(x_r, x_r.shape[-1:]))
    return (q.view(n, layer.heads, layer.dh) * k).sum(-1) * model.config.alpha


@torch.no_grad()
def test_at_step_zero_a_t_token_attends_more_to_an_r_token_of_its_own_content():
    torch.manual_seed(0)
    aligned = MTFM(tiny_schema(), tiny_config(similarity_init=True))
    gap = (_scores(aligned, True) - _scores(aligned, False)).mean().item()
    torch.manual_seed(0)
    plain = MTFM(tiny_schema(), tiny_config())
    plain_gap = (_scores(plain, True) - _scores(plain, False)).mean().item()
    assert gap > 0.02  # 0.04 here; tokens also carry age and distance, which the R-token lacks
    assert gap > 10 * abs(plain_gap)


def test_self_bias_init_sets_gap_bucket_zero_of_every_head_only():
    config = tiny_config(relative_time_bias=True, time_bias_init="horizons", time_bias_self_init=-6.0, num_heads=4,
                         num_kv_groups=2)
    bias = _initial_time_bias(config)
    assert torch.all(bias[:, 0] == -6.0)
    horizons = _initial_time_bias(config.model_copy(update={"time_bias_self_init": 0.0}))
    assert torch.equal(bias[:, 1:], horizons[:, 1:])
    with pytest.raises(ValueError):
        tiny_config(time_bias_self_init=1.0)  # it may only close the own key, never favour it


@torch.no_grad()
def test_a_closed_self_key_gives_the_same_logits_on_every_cpu_backend():
    """The jagged backend scores a T-token's own key on a separate path from its context keys; with
    the self bias that path must still equal the dense reference mask."""
    schema = tiny_schema()
    batch = random_batch(schema, 6, seed=3)
    logits = {}
    for backend in ("reference", "jagged"):
        torch.manual_seed(0)
        model = MTFM(schema, tiny_config(relative_time_bias=True, time_bias_self_init=-6.0, similarity_init=True,
                                         attention_backend=backend)).eval()
        logits[backend] = model(batch).logits
    for name, ref in logits["reference"].items():
        torch.testing.assert_close(logits["jagged"][name], ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_closing_the_self_key_changes_what_a_t_token_without_context_computes():
    """A T-token with no history and no real-time actions sees only itself: with the self key open
    its first attention output is its own value, with it closed almost nothing."""
    schema = tiny_schema()
    lengths = {"orders": [0, 0], "clicks": [0, 0], "recent": [0, 0]}
    batch = random_batch(schema, 2, seed=5, lengths=lengths)
    outs = {}
    for self_init in (0.0, -6.0):
        torch.manual_seed(0)
        config = tiny_config(relative_time_bias=True, time_bias_self_init=self_init, similarity_init=True)
        model = MTFM(schema, config).eval()
        layer = next(m for m in model.stack.modules() if isinstance(m, TargetAttentionLayer))
        seen = []
        original = layer._attend
        layer._attend = lambda *a, _o=original, _s=seen: _s.append(_o(*a)) or _s[-1]
        model(batch)
        outs[self_init] = seen[0].abs().mean().item()
    assert outs[-6.0] < 0.2 * outs[0.0]
