"""Content match (``content_match``, mtfm.model.content): what it adds to the attention score, and
that it is one computation on every backend, on the subgraph, and off when its weights are zero."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtfm.data.batch import TOKEN_R, TOKEN_T
from mtfm.kernels import AttentionLayout
from mtfm.model import MTFM
from mtfm.model.content import append_content, link_tables
from mtfm.sharing import format_sharing_plan
from mtfm.model.testing import random_batch, schema_from_dict, tiny_config, tiny_schema

torch.set_num_threads(1)
SCHEMA = tiny_schema()


def _model(backend: str = "jagged", **overrides) -> MTFM:
    torch.manual_seed(0)
    model = MTFM(SCHEMA, tiny_config(content_match=True, attention_backend=backend, **overrides)).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "match_scale" in name:
                p.add_(torch.randn_like(p))  # every head and table its own weight
    return model


def test_the_link_tables_are_the_ones_a_scenario_shares_with_a_sequence() -> None:
    model = MTFM(SCHEMA, tiny_config(content_match=True))
    assert link_tables(model.embeddings) == ["item_id", "tags"]
    assert model.content_links == ["item_id", "tags"]
    layer = model.stack.blocks[0].targets[0]
    assert tuple(layer.match_scale.shape) == (2, 2)  # heads x link tables
    assert torch.all(layer.match_scale == tiny_config().content_match_init)


def test_the_augmented_dot_product_adds_weight_times_cosine_on_context_keys_only() -> None:
    g = torch.Generator().manual_seed(1)
    n, heads, groups, d, widths = 6, 4, 2, 5, [3, 2]
    q = torch.randn(3, heads, d, generator=g, dtype=torch.float64)
    k = torch.randn(n, groups, d, generator=g, dtype=torch.float64)
    raw = torch.randn(n, sum(widths), generator=g, dtype=torch.float64)
    content = torch.cat([F.normalize(s, dim=-1) for s in raw.split(widths, dim=1)], dim=1)
    token_type = torch.tensor([TOKEN_R, TOKEN_R, TOKEN_R, TOKEN_T, TOKEN_T, TOKEN_T])
    query_index = torch.tensor([3, 4, 5])
    scale = torch.randn(heads, len(widths), generator=g, dtype=torch.float64)
    alpha = 0.3
    layout = AttentionLayout(torch.tensor([0, n]), token_type, torch.arange(n), torch.zeros(n, dtype=torch.long),
                             content=content)
    weight = scale.repeat_interleave(torch.tensor(widths), dim=1) / alpha  # as the layer passes it
    q2, k2 = append_content(q, k, layout, query_index, weight)
    for qi, token in enumerate(query_index.tolist()):
        for key in range(n):
            for h in range(heads):
                got = alpha * float(q2[qi, h] @ k2[key, h // 2])
                want = alpha * float(q[qi, h] @ k[key, h // 2])
                if token_type[key] != TOKEN_T:
                    cos = [float(a @ b) for a, b in zip(content[token].split(widths), content[key].split(widths))]
                    want += sum(float(scale[h, f]) * cos[f] for f in range(len(widths)))
                assert got == pytest.approx(want, abs=1e-12)


def test_a_context_key_of_the_querys_own_item_gets_more_attention() -> None:
    """One user: two real-time keys with identical keys and values except their item; the one whose
    item is the T-token's own gets SiLU(s + w) where the other gets SiLU(s + w cos)."""
    model = _model("reference")
    layer = model.stack.blocks[0].targets[0]
    with torch.no_grad():
        layer.match_scale.zero_()
        layer.match_scale[:, 0] = 3.0  # item_id only
    content = torch.zeros(3, 16 // 4 * 2, dtype=torch.float64)  # item_id (4) | tags (4)
    same, other = F.normalize(torch.randn(4, dtype=torch.float64), dim=0), F.normalize(torch.randn(4, dtype=torch.float64), dim=0)
    content[0, :4], content[1, :4], content[2, :4] = same, other, same  # keys: same item, other item; query: same
    layout = AttentionLayout(torch.tensor([0, 3]), torch.tensor([TOKEN_R, TOKEN_R, TOKEN_T]), torch.tensor([1, 2, 3]),
                             torch.zeros(3, dtype=torch.long), content=content)
    q = torch.zeros(1, 2 * layer.dh, dtype=torch.float64)
    k = torch.zeros(3, 1, layer.dh, dtype=torch.float64)
    v = torch.zeros(3, 1, layer.dh, dtype=torch.float64)
    v[0, 0, 0], v[1, 0, 1] = 1.0, 1.0  # each key writes its own coordinate
    a = layer._attend(q, k, v, layout.queries("target"), layout).view(2, layer.dh)
    norm = 1.0 / model.config.attention_norm_len
    cos = float(same @ other)
    torch.testing.assert_close(a[:, 0], torch.full((2,), float(F.silu(torch.tensor(3.0))) * norm, dtype=torch.float64))
    torch.testing.assert_close(a[:, 1], torch.full((2,), float(F.silu(torch.tensor(3.0 * cos))) * norm, dtype=torch.float64))


def _triton_usable() -> bool:
    try:
        import triton  # noqa: F401  (conftest.py selects its CPU interpreter when there is no CUDA)
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("seed,backend", [(0, "jagged"), (1, "jagged"), pytest.param(
    2, "triton", marks=pytest.mark.skipif(not _triton_usable(), reason="Triton is not installed"))])
def test_every_backend_computes_the_same_logits_and_gradients(seed: int, backend: str) -> None:
    batch = random_batch(SCHEMA, 4, seed=seed)
    outputs = {}
    for backend in ("reference", backend):
        model = _model(backend, relative_time_bias=True)
        out = model(batch)
        loss = sum(l.sum() for l in out.logits.values())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outputs[backend] = (out.logits, grads)
    ref_logits, ref_grads = outputs["reference"]
    logits, grads = outputs[backend]
    # the Triton kernel accumulates in float32 whatever the input precision
    tol = dict(atol=1e-6, rtol=1e-5) if backend == "triton" else dict(atol=1e-10, rtol=1e-9)
    for s in ref_logits:
        torch.testing.assert_close(logits[s], ref_logits[s], **tol)
    assert any("match_scale" in n for n in ref_grads) and any(n.startswith("embeddings.tables.item_id") for n in ref_grads)
    assert set(grads) == set(ref_grads)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **(tol if backend == "triton" else dict(atol=1e-10, rtol=1e-8)),
                                   msg=lambda m: f"{n}: {m}")


def test_zero_weights_give_the_model_without_content_match() -> None:
    batch = random_batch(SCHEMA, 5, seed=3)
    with_match = _model()
    torch.manual_seed(0)
    plain = MTFM(SCHEMA, tiny_config()).double()
    missing, unexpected = plain.load_state_dict(with_match.state_dict(), strict=False)
    assert not missing and all("match_scale" in n for n in unexpected)
    with torch.no_grad():
        for name, p in with_match.named_parameters():
            if "match_scale" in name:
                p.zero_()
        got, want = with_match(batch).logits, plain(batch).logits
        changed = _model()(batch).logits  # nonzero weights do change the logits
    for s in want:
        torch.testing.assert_close(got[s], want[s], atol=1e-12, rtol=0)
    assert any(not torch.allclose(changed[s], want[s]) for s in want)


def test_a_scenario_subgraph_matches_content_as_the_full_model_does() -> None:
    from mtfm.model.batch_ops import restrict_batch

    model = _model().eval()
    batch = random_batch(SCHEMA, 4, seed=5)
    with torch.no_grad():
        for name in SCHEMA.scenario_names:
            sub = model.scenario_subgraph(name)
            want = model(restrict_batch(batch, [name])).logits[name]
            torch.testing.assert_close(sub(restrict_batch(batch, [name])).logits[name], want, atol=1e-12, rtol=0)


def test_without_a_shared_table_content_match_is_off_and_the_sharing_plan_says_so() -> None:
    schema = schema_from_dict({
        "window": 100, "split": {"valid_fraction": 0.1, "test_fraction": 0.1},
        "history": [{"name": "clicks", "table": "clicks", "max_len": 5,
                     "features": [{"name": "item_id", "kind": "categorical", "num_embeddings": 9}]}],
        "scenarios": [{"name": "feed", "table": "feed",
                       "item_features": [{"name": "item_id", "kind": "categorical", "num_embeddings": 9}],
                       "tasks": [{"name": "ctr", "labels": ["click"]}]}],
    }, "<no shares>")
    model = MTFM(schema, tiny_config(content_match=True))
    assert model.content_links == [] and all(l.match_scale is None for b in model.stack.blocks for l in b.targets)
    assert "no table is shared by a scenario and a sequence" in format_sharing_plan(schema)
    assert "content match (model option content_match) compares: 'item_id', 'tags'" in format_sharing_plan(SCHEMA)


def test_a_layout_without_content_vectors_is_refused() -> None:
    model = _model()
    batch = random_batch(SCHEMA, 2, seed=0)
    layout = AttentionLayout.from_token_layout(batch.layout)
    layer = model.stack.blocks[0].targets[0]
    q = torch.zeros(layout.queries("target").num_queries, 2 * layer.dh, dtype=torch.float64)
    kv = torch.zeros(layout.num_tokens, 1, layer.dh, dtype=torch.float64)
    with pytest.raises(ValueError, match="carries no content"):
        layer._attend(q, kv, kv, layout.queries("target"), layout)
