"""Attention kernels: the dynamic mask rule, the reference, the jagged path, GQA."""

from __future__ import annotations

from unittest import mock

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtfm.data.batch import TOKEN_H, TOKEN_R, TOKEN_T, TokenLayout
from mtfm.kernels import AttentionLayout, AttentionParams, hstu_attention, jagged
from mtfm.kernels.jagged import _MIN_WASTE, group_users, plan_for
from mtfm.model.mask import dense_user_mask

H, R, T = TOKEN_H, TOKEN_R, TOKEN_T


def test_mask_follows_the_three_rules_of_the_paper():
    # H1 H2 | R1(5) R3(6) R2(8) | T1(6) T2(9): R3 shares T1's timestamp and must stay hidden from it.
    types = torch.tensor([H, H, R, R, R, T, T])
    times = torch.tensor([1, 2, 5, 6, 8, 6, 9])
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0, 0],  # H1 sees H; R-tokens are all later
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],  # R1 sees H and itself
            [1, 1, 1, 1, 0, 0, 0],  # R3 sees the earlier R1
            [1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0, 1, 0],  # T1 (t=6): R3 (t=6) and R2 (t=8) hidden, no other T
            [1, 1, 1, 1, 1, 0, 1],  # T2 (t=9): every R is earlier; T1 hidden
        ],
        dtype=torch.bool,
    )
    assert torch.equal(dense_user_mask(types, times), expected)


def _layout(shapes: list[tuple[int, int, int]], seed: int) -> AttentionLayout:
    """Users with (L_H, L_R, L_T) tokens; H before 50, R in [30, 100), T in [50, 100) (ties happen)."""
    g = torch.Generator().manual_seed(seed)
    types, times, offsets = [], [], [0]
    for lh, lr, lt in shapes:
        types += [H] * lh + [R] * lr + [T] * lt
        times += torch.sort(torch.randint(0, 50, (lh,), generator=g)).values.tolist()
        times += torch.sort(torch.randint(30, 100, (lr,), generator=g)).values.tolist()
        times += torch.randint(50, 100, (lt,), generator=g).tolist()
        offsets.append(offsets[-1] + lh + lr + lt)
    n = offsets[-1]
    zeros = torch.zeros(n, dtype=torch.long)
    return AttentionLayout.from_token_layout(
        TokenLayout(torch.tensor(offsets), zeros, torch.tensor(types, dtype=torch.long), torch.tensor(times, dtype=torch.long), zeros)
    )


def _inputs(layout: AttentionLayout, kind: str, heads: int, groups: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    queries = layout.queries(kind)
    q = torch.randn(queries.num_queries, heads, dim, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(layout.num_tokens, groups, dim, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(layout.num_tokens, groups, dim, generator=g, dtype=torch.float64, requires_grad=True)
    return queries, q, k, v


def _run(backend, q, k, v, queries, layout, params, wrt=None):
    """Output and the gradients of a fixed linear function of it (w.r.t. ``wrt``, default q, k, v)."""
    out = hstu_attention(q, k, v, queries, layout, params, backend)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    grads = torch.autograd.grad((out * weights).sum(), wrt or (q, k, v))
    return out, grads


user_shapes = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 5), st.integers(0, 4)), min_size=1, max_size=5)
heads_groups = st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4), (3, 1)])


@settings(max_examples=40, deadline=None)
@given(
    shapes=user_shapes,
    hg=heads_groups,
    kind=st.sampled_from(["all", "target"]),
    bias=st.sampled_from([(0, 0), (6, 0), (0, 5), (6, 5)]),
    slack=st.sampled_from([0.0, 0.25, 4.0]),
    chunk=st.sampled_from([1, 7, 1 << 18]),
    direct=st.sampled_from([0, 1 << 22]),
    seed=st.integers(0, 10_000),
)
def test_jagged_attention_matches_reference_forward_and_backward(shapes, hg, kind, bias, slack, chunk, direct, seed):
    layout = _layout(shapes, seed)
    heads, groups = hg
    queries, q, k, v = _inputs(layout, kind, heads, groups, 4, seed)
    time_buckets, position_buckets = bias
    table = None
    if time_buckets or position_buckets:
        width = max(time_buckets, 1) * max(position_buckets, 1)
        table = torch.randn(heads, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64, requires_grad=True)
    params = AttentionParams(alpha=0.5, norm=1 / 8, num_kv_groups=groups, bias=table, time_buckets=time_buckets,
                             position_buckets=position_buckets, padding_slack=slack)
    wrt = (q, k, v) if table is None else (q, k, v, table)
    ref, ref_grads = _run("reference", q, k, v, queries, layout, params, wrt)
    # small chunks exercise the chunked kernel's loop; direct = 0 sends every bucket to that kernel,
    # a large direct bound sends every bucket to the plain-autograd path
    with mock.patch.object(jagged, "_CHUNK_CELLS", chunk), mock.patch.object(jagged, "_DIRECT_CELLS", direct):
        jag, jag_grads = _run("jagged", q, k, v, queries, layout, params, wrt)
    torch.testing.assert_close(jag, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(jag_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _naive_mha(q, k, v, queries, layout, alpha, norm):
    """One head, one user, one query at a time, with the mask written out literally."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype)
    types, times = layout.token_type.tolist(), layout.timestamps.tolist()
    user = layout.user.tolist()
    for row, i in enumerate(queries.index.tolist()):
        for h in range(q.shape[1]):
            acc = torch.zeros(v.shape[2], dtype=q.dtype)
            for j in range(layout.num_tokens):
                if user[j] != user[i]:
                    continue
                seen = types[j] == H or (types[j] == R and times[j] < times[i]) or j == i
                if seen:
                    acc = acc + torch.nn.functional.silu(alpha * (q[row, h] @ k[j, h])) * norm * v[j, h]
            out[row, h] = acc
    return out


@settings(max_examples=10, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(1, 3)), min_size=1, max_size=3),
       kind=st.sampled_from(["all", "target"]), seed=st.integers(0, 1000))
def test_gqa_equals_mha_when_groups_equal_heads(shapes, kind, seed):
    layout = _layout(shapes, seed)
    queries, q, k, v = _inputs(layout, kind, 3, 3, 4, seed)
    params = AttentionParams(alpha=0.5, norm=0.25, num_kv_groups=3)
    expected = _naive_mha(q.detach(), k.detach(), v.detach(), queries, layout, 0.5, 0.25)
    for backend in ("reference", "jagged"):
        got = hstu_attention(q, k, v, queries, layout, params, backend)
        torch.testing.assert_close(got.detach(), expected, rtol=1e-10, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(shapes=user_shapes, hg=st.sampled_from([(2, 1), (4, 2), (6, 2), (6, 3)]), kind=st.sampled_from(["all", "target"]),
       seed=st.integers(0, 10_000))
def test_gqa_matches_repeat_kv_reference_when_groups_fewer_than_heads(shapes, hg, kind, seed):
    heads, groups = hg
    layout = _layout(shapes, seed)
    queries, q, k, v = _inputs(layout, kind, heads, groups, 4, seed)
    r = heads // groups
    grouped = AttentionParams(alpha=0.5, norm=0.25, num_kv_groups=groups)
    repeated = AttentionParams(alpha=0.5, norm=0.25, num_kv_groups=heads)
    # Multi-head attention where head h is given the keys/values of group h // r.
    kr, vr = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    expected, expected_grads = _run("reference", q, kr, vr, queries, layout, repeated, wrt=(q, k, v))
    for backend in ("reference", "jagged"):
        got, grads = _run(backend, q, k, v, queries, layout, grouped)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        for a, b in zip(grads, expected_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(shapes=user_shapes, seed=st.integers(0, 1000), kind=st.sampled_from(["all", "target"]))
def test_attention_of_a_user_does_not_depend_on_a_longer_user_in_the_batch(shapes, seed, kind):
    alone = _layout(shapes, seed)
    together = _layout(shapes + [(40, 30, 20)], seed)  # same first users (same draws), one long user appended
    params = AttentionParams(alpha=0.5, norm=1 / 16, num_kv_groups=1)
    qa, q, k, v = _inputs(alone, kind, 2, 1, 4, seed)
    qt, q2, k2, v2 = _inputs(together, kind, 2, 1, 4, seed + 7)
    n, nq = alone.num_tokens, qa.num_queries
    with torch.no_grad():
        q2[:nq], k2[:n], v2[:n] = q, k, v
    for backend in ("reference", "jagged"):
        a = hstu_attention(q, k, v, qa, alone, params, backend)
        b = hstu_attention(q2, k2, v2, qt, together, params, backend)[:nq]
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(q_len=st.lists(st.integers(0, 300), min_size=1, max_size=40), c_len=st.data(), slack=st.sampled_from([0.0, 0.25, 1.0]))
def test_jagged_buckets_cover_every_user_once_with_bounded_padding(q_len, c_len, slack):
    c = c_len.draw(st.lists(st.integers(0, 300), min_size=len(q_len), max_size=len(q_len)))
    buckets = group_users(q_len, c, slack)
    members = sorted(u for b in buckets for u in b)
    assert members == [u for u in range(len(q_len)) if q_len[u] > 0 and c[u] > 0]
    for b in buckets:
        padded = len(b) * max(q_len[u] for u in b) * max(c[u] for u in b)
        real = sum(q_len[u] * c[u] for u in b)
        assert padded <= (1 + slack) * real or padded - real <= _MIN_WASTE


def test_jagged_plan_is_built_once_per_batch_and_shared_by_layers():
    layout = _layout([(5, 3, 2), (2, 2, 4)], 0)
    queries = layout.queries("target")
    assert plan_for(queries, layout, 0.25) is plan_for(layout.queries("target"), layout, 0.25)


def test_log_buckets_are_exact_bit_lengths_around_every_power_of_two():
    """floor(log2(1 + |gap|)) without float log2 (inexact at powers of two on CUDA)."""
    from mtfm.kernels.common import log_buckets

    gaps = sorted({max(0, (1 << e) + d - 1) for e in range(0, 53) for d in (-1, 0, 1)})
    got = log_buckets(torch.tensor(gaps + [-g for g in gaps], dtype=torch.long), 64).tolist()
    want = [(g + 1).bit_length() - 1 for g in gaps] * 2
    assert got == want
    assert log_buckets(torch.tensor([7, 8, 1 << 40]), 4).tolist() == [3, 3, 3]
