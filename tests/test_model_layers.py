"""Layers: Group LayerNorm, target vs full attention, fused K/V, the HTA configurations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtfm.data.batch import TOKEN_T
from mtfm.kernels import AttentionLayout
from mtfm.model import MTFM
from mtfm.model.embedding import module_key
from mtfm.model.hta import HTABlock, TokenGroups
from mtfm.model.layers import FullAttentionLayer, GroupLayerNorm, TargetAttentionLayer, fused_context_kv
from mtfm.model.testing import random_batch, tiny_config, tiny_schema

SCHEMA = tiny_schema()
GROUPS = SCHEMA.token_groups()
TARGET_GROUPS = [g for g in GROUPS if g.startswith("T:")]


def test_gln_normalises_each_group_with_its_own_parameters():
    gln = GroupLayerNorm(["a", "b", "c"], 6)
    with torch.no_grad():
        for i, g in enumerate(["a", "b", "c"]):
            gln.weight[g].copy_(torch.arange(6.0) + 10 * i)
            gln.bias[g].fill_(float(i))
    x = torch.randn(9, 6, dtype=torch.float32)
    ids = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2])
    out = gln(x, ids)
    for g, i in zip(["a", "b", "c"], range(3)):
        rows = ids == i
        own = torch.nn.functional.layer_norm(x[rows], (6,), gln.weight[g], gln.bias[g], eps=gln.eps)
        torch.testing.assert_close(out[rows], own)
    # Changing one group's parameters changes only that group's rows.
    with torch.no_grad():
        gln.weight["b"].mul_(3)
    changed = (gln(x, ids) != out).any(dim=1)
    assert torch.equal(changed, ids == 1)


def test_gln_subset_shares_parameters_of_the_kept_groups_only():
    gln = GroupLayerNorm(GROUPS, 4)
    sub = gln.subset(["H:orders", "T:food"])
    assert sub.weight[module_key("T:food")] is gln.weight[module_key("T:food")]
    assert sorted(sub.state_dict()) == ["bias.H_orders", "bias.T_food", "weight.H_orders", "weight.T_food"]


def _batch_and_groups(seed: int, batch_size: int = 4):
    batch = random_batch(SCHEMA, batch_size, seed=seed)
    layout = AttentionLayout.from_token_layout(batch.layout)
    gid = batch.layout.group_ids  # this batch holds every group, in schema order
    target = gid[layout.queries("target").index] - (len(SCHEMA.history) + len(SCHEMA.realtime))
    return batch, layout, TokenGroups(gid, target)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), hg=st.sampled_from([(2, 1), (2, 2), (4, 2)]), bias=st.booleans(),
       backend=st.sampled_from(["reference", "jagged"]))
def test_target_layer_equals_full_layer_with_non_target_rows_discarded(seed, hg, bias, backend):
    cfg = tiny_config(num_heads=hg[0], num_kv_groups=hg[1], relative_time_bias=bias, relative_position_bias=bias,
                      attention_backend=backend, target_layers_per_block=1, full_layers_per_block=0)
    target_block = HTABlock(cfg, GROUPS, TARGET_GROUPS).double()
    _randomise(target_block, seed)
    layer: TargetAttentionLayer = target_block.targets[0]
    full = FullAttentionLayer(cfg, GROUPS).double()
    with torch.no_grad():  # the same weights, arranged as one f1 = [U; Q | K; V]
        full.f1.weight.copy_(torch.cat([layer.f_uq.weight, layer.f_kv.weight]))
        full.f1.bias.copy_(torch.cat([layer.f_uq.bias, layer.f_kv.bias]))
        full.f2.load_state_dict(layer.f2.state_dict())
        full.gln_in.load_state_dict(layer.gln_in.state_dict())
        for g in TARGET_GROUPS:
            key = module_key(g)
            full.gln_attn.weight[key].copy_(layer.gln_attn.weight[key])
            full.gln_attn.bias[key].copy_(layer.gln_attn.bias[key])
        if bias:
            full.time_bias.copy_(layer.time_bias)
            full.position_bias.copy_(layer.position_bias)
    batch, layout, groups = _batch_and_groups(seed)
    x = torch.randn(layout.num_tokens, cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    is_t = layout.token_type == TOKEN_T
    out_target = target_block(x, groups, layout)
    out_full = full(x, groups, layout)
    assert torch.equal(out_target[~is_t], x[~is_t])  # non-T rows pass through untouched
    torch.testing.assert_close(out_target[is_t], out_full[is_t], rtol=1e-10, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 4), bias=st.booleans())
def test_fused_context_kv_equals_per_layer_projection_forward_and_backward(seed, k, bias):
    cfg = tiny_config(target_layers_per_block=k, relative_time_bias=bias)
    layers = [TargetAttentionLayer(cfg, GROUPS, TARGET_GROUPS).double() for _ in range(k)]
    for i, layer in enumerate(layers):
        _randomise(layer, seed + i)
    batch, layout, groups = _batch_and_groups(seed)
    ctx = layout.context().index
    x = torch.randn(layout.num_tokens, cfg.d_model, dtype=torch.float64, requires_grad=True)
    fused = fused_context_kv(layers, x[ctx], groups.all[ctx])
    plain = [layer.context_kv(x[ctx], groups.all[ctx]) for layer in layers]
    params = [x, *[p for layer in layers for p in (layer.f_kv.weight, layer.f_kv.bias, *layer.gln_in.parameters())]]
    probe = [torch.randn_like(t) for pair in plain for t in pair]
    loss_f = sum((t * w).sum() for t, w in zip([t for pair in fused for t in pair], probe))
    loss_p = sum((t * w).sum() for t, w in zip([t for pair in plain for t in pair], probe))
    for (kf, vf), (kp, vp) in zip(fused, plain):
        torch.testing.assert_close(kf, kp, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(vf, vp, rtol=1e-10, atol=1e-12)
    for gf, gp in zip(torch.autograd.grad(loss_f, params), torch.autograd.grad(loss_p, params)):
        torch.testing.assert_close(gf, gp, rtol=1e-10, atol=1e-12)


def test_fused_and_plain_target_kv_give_the_same_model_output():
    torch.manual_seed(0)
    fused = MTFM(SCHEMA, tiny_config(target_layers_per_block=3, blocks=1)).double().eval()
    plain = MTFM(SCHEMA, tiny_config(target_layers_per_block=3, blocks=1, fuse_target_kv=False)).double().eval()
    plain.load_state_dict(fused.state_dict())
    batch = random_batch(SCHEMA, 5, seed=3)
    a, b = fused(batch), plain(batch)
    for s in a.logits:
        torch.testing.assert_close(a.logits[s], b.logits[s], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec, targets, fulls", [
    ("(0:16)x1", 0, 16), ("(16:0)x1", 16, 0), ("(1:1)x8", 8, 8), ("(3:1)x4", 12, 4), ("(5:1)x3", 15, 3),
])
def test_hta_configurations_of_the_paper_build_the_stated_layers_and_run(spec, targets, fulls):
    cfg = tiny_config(d_model=8, tokenizer_hidden=[8], mmoe_expert_hidden=[8]).with_hta(spec)
    model = MTFM(SCHEMA, cfg).eval()
    layers = [layer for block in model.stack.blocks for layer in (*block.targets, *block.fulls)]
    assert sum(isinstance(layer, TargetAttentionLayer) for layer in layers) == targets
    assert sum(isinstance(layer, FullAttentionLayer) for layer in layers) == fulls
    assert cfg.hta == spec
    out = model(random_batch(SCHEMA, 3, seed=1))
    assert all(torch.isfinite(v).all() for v in out.logits.values())


@pytest.mark.parametrize("hta", ["(1:1)x2", "(0:3)x1", "(2:2)x1"])
def test_pruned_last_full_layer_gives_the_unpruned_model_output(hta):
    torch.manual_seed(0)
    pruned = MTFM(SCHEMA, tiny_config().with_hta(hta)).double().eval()
    plain = MTFM(SCHEMA, tiny_config(prune_last_full_layer=False).with_hta(hta)).double().eval()
    last = pruned.stack.blocks[-1].fulls[-1]
    assert last.pruned and last.gln_attn.groups == TARGET_GROUPS
    state = plain.state_dict()
    state.update(pruned.state_dict())  # the plain model's extra non-T GLN rows keep their own values
    plain.load_state_dict(state)
    batch = random_batch(SCHEMA, 5, seed=4)
    a, b = pruned(batch), plain(batch)
    for s in a.logits:
        torch.testing.assert_close(a.logits[s], b.logits[s], rtol=1e-10, atol=1e-12)
