"""Triton HSTU attention (mtfm.kernels.triton_attention) against the PyTorch reference.

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here before
Triton is imported) at small shapes; the whole file is skipped when Triton is not installed.
Tests at real shapes need a GPU and say so when skipped. The reference runs in float64 on the
same (rounded) inputs; tolerances are relative to the reference's largest value.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported anywhere
triton = pytest.importorskip("triton", reason="triton is not installed: `pip install -e '.[test]'` brings it on Linux x86-64")
if os.environ.get("TRITON_INTERPRET") == "1" and tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9):
    pytest.skip(f"triton {triton.__version__}'s interpreter breaks on numpy 2.4 (needs 3.9+)", allow_module_level=True)

from mtfm.data.batch import NEVER, TOKEN_H, TOKEN_R, TOKEN_T, TokenLayout  # noqa: E402
from mtfm.kernels import AttentionLayout, AttentionParams, hstu_attention, resolve_backend  # noqa: E402
from mtfm.kernels import triton_attention as ta  # noqa: E402

H, R, T = TOKEN_H, TOKEN_R, TOKEN_T
DEVICE = "cuda" if CUDA and not ta.interpreting() else "cpu"
gpu_only = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (real shapes are too slow for the interpreter)")


def _layout(users: list[tuple[int, int, int]], seed: int, max_len: int | None, base: int = 0,
            device: str = DEVICE) -> AttentionLayout:
    """Users of (L_H, L_R, L_T) tokens in (H; R; T) order. H before 50, R in [30, 100), T in [50, 100)
    (ties with R happen); R expiry from the ``max_len`` rule (None: never expires); ``base`` shifts
    every clock (millisecond-sized clocks exercise the int64 comparisons)."""
    g = torch.Generator().manual_seed(seed)
    types, times, expiry, offsets = [], [], [], [0]
    for lh, lr, lt in users:
        h = torch.sort(torch.randint(0, 50, (lh,), generator=g)).values.tolist()
        r = torch.sort(torch.randint(30, 100, (lr,), generator=g)).values.tolist()
        t = torch.randint(50, 100, (lt,), generator=g).tolist()
        types += [H] * lh + [R] * lr + [T] * lt
        times += h + r + t
        r_exp = [r[i + max_len] + base if max_len is not None and i + max_len < lr else NEVER for i in range(lr)]
        expiry += [NEVER] * lh + r_exp + [NEVER] * lt
        offsets.append(offsets[-1] + lh + lr + lt)
    n = offsets[-1]
    zeros = torch.zeros(n, dtype=torch.long)
    layout = TokenLayout(torch.tensor(offsets), zeros, torch.tensor(types, dtype=torch.long),
                         torch.tensor(times, dtype=torch.long) + base, zeros, torch.tensor(expiry, dtype=torch.long))
    layout = TokenLayout(*(t.to(device) for t in (layout.offsets, layout.group_ids, layout.token_type, layout.timestamps,
                                                  layout.source_row, layout.expiry)))
    return AttentionLayout.from_token_layout(layout)


def _compare(users, heads, groups, dim, vdim, kind, buckets, max_len, dtype, seed, base=0):
    """Forward and backward (q, k, v and the bias table) of triton vs the float64 reference."""
    layout = _layout(users, seed, max_len, base)
    queries = layout.queries(kind)
    g = torch.Generator().manual_seed(seed + 1)
    n, nq = layout.num_tokens, queries.num_queries
    q = torch.randn(nq, heads, dim, generator=g).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(n, groups, dim, generator=g).to(DEVICE, dtype).requires_grad_()
    v = torch.randn(n, groups, vdim, generator=g).to(DEVICE, dtype).requires_grad_()
    tb, pb = buckets
    table = None
    if tb or pb:
        table = torch.randn(heads, max(tb, 1) * max(pb, 1), generator=g).to(DEVICE).requires_grad_()
    params = AttentionParams(alpha=0.5, norm=1 / 8, num_kv_groups=groups, bias=table, time_buckets=tb, position_buckets=pb)
    grad = torch.randn(nq, heads, vdim, generator=g).to(DEVICE)
    wrt = [q, k, v] + ([table] if table is not None else [])
    out = hstu_attention(q, k, v, queries, layout, params, "triton")
    grads = torch.autograd.grad((out.float() * grad).sum(), wrt) if nq else [torch.zeros_like(t) for t in wrt]

    # The truth runs on the CPU: on CUDA, float64 log2 is not exact at powers of two (log2(8) =
    # 2.9999999999999996, pytorch/pytorch#156929), which moves the reference's time buckets.
    cpu_layout = _layout(users, seed, max_len, base, device="cpu")
    cpu_queries = cpu_layout.queries(kind)
    ref_in = [t.detach().cpu().double().requires_grad_() for t in wrt]
    ref_params = AttentionParams(alpha=0.5, norm=1 / 8, num_kv_groups=groups, bias=ref_in[3] if table is not None else None,
                                 time_buckets=tb, position_buckets=pb)
    ref = hstu_attention(ref_in[0], ref_in[1], ref_in[2], cpu_queries, cpu_layout, ref_params, "reference")
    ref_grads = torch.autograd.grad((ref * grad.cpu().double()).sum(), ref_in, allow_unused=True) if nq else \
        [torch.zeros_like(t) for t in ref_in]

    assert out.dtype == dtype and out.shape == ref.shape
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    for name, got, want in [("out", out, ref)] + list(zip(["dq", "dk", "dv", "dbias"], grads, ref_grads)):
        want = want if want is not None else torch.zeros(got.shape, dtype=torch.float64)
        want = want.detach()
        scale = max(float(want.abs().max()) if want.numel() else 0.0, 1.0)
        err = float((got.detach().cpu().double() - want).abs().max()) if want.numel() else 0.0
        assert err <= rel * scale, f"{name}: max |triton - reference| = {err:.3g} > {rel * scale:.3g}"


users = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 8), st.integers(0, 5)), min_size=1, max_size=3)
heads_groups = st.sampled_from([(1, 1), (2, 1), (3, 1), (4, 2), (2, 2)])


@settings(max_examples=14, deadline=None)
@given(users=users, hg=heads_groups, dims=st.sampled_from([(4, 4), (8, 8), (12, 4), (16, 20)]),
       kind=st.sampled_from(["all", "target"]), buckets=st.sampled_from([(0, 0), (5, 0), (0, 4), (5, 4)]),
       max_len=st.sampled_from([None, 1, 3]), seed=st.integers(0, 10_000))
def test_triton_matches_reference_fp32(users, hg, dims, kind, buckets, max_len, seed):
    _compare(users, *hg, *dims, kind, buckets, max_len, torch.float32, seed)


@settings(max_examples=5, deadline=None)
@given(users=users, hg=heads_groups, kind=st.sampled_from(["all", "target"]), buckets=st.sampled_from([(0, 0), (5, 4)]),
       seed=st.integers(0, 10_000))
def test_triton_matches_reference_bf16(users, hg, kind, buckets, seed):
    _compare(users, *hg, 16, 16, kind, buckets, 2, torch.bfloat16, seed)


@pytest.mark.parametrize("users, kind", [
    ([(0, 0, 0), (3, 2, 2), (0, 0, 0)], "all"),  # empty users around a real one
    ([(0, 0, 3), (2, 0, 0)], "all"),  # a T-only user (only self terms), a user without T
    ([(0, 0, 2), (0, 3, 0)], "target"),  # no context at all for the T user; a user without queries
    ([(4, 20, 2)], "all"),  # many R-tokens with a short max_len: the rank rule (finite expiry) does the work
    ([(20, 0, 0)], "target"),  # no T token anywhere: zero queries
])
def test_triton_edge_cases(users, kind):
    _compare(users, 3, 1, 8, 8, kind, (5, 4), 2, torch.float32, seed=3)


def test_triton_int64_clocks_and_several_key_blocks():
    """Millisecond clocks (beyond int32) and users longer than one key block (gaps cross blocks)."""
    _compare([(30, 12, 4), (1, 25, 3)], 2, 1, 8, 8, "all", (24, 6), 4, torch.float32, seed=7, base=1_700_000_000_000)


def test_log_bucket_is_exact_integer_math():
    """``min(floor(log2(1 + |gap|)), NUM - 1)`` at and around every power of two, no float rounding."""
    import triton.language as tl

    @triton.jit
    def bucket_kernel(gap_ptr, out_ptr, NUM: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(out_ptr + i, ta._log_bucket(tl.load(gap_ptr + i), NUM))

    values = [0, 1, 2, 3]
    for e in range(2, 62):
        values += [(1 << e) - 2, (1 << e) - 1, 1 << e]
    values = values + [-x for x in values]
    values += [0] * (512 - len(values))
    gap = torch.tensor(values, dtype=torch.int64, device=DEVICE)
    for num in (2, 16, 32, 40, 64):
        out = torch.empty(512, dtype=torch.int32, device=DEVICE)
        bucket_kernel[(1,)](gap, out, NUM=num, BLOCK=512)
        want = [min((abs(x) + 1).bit_length() - 1, num - 1) for x in values]
        assert out.tolist() == want, num


def test_backends_dispatch_and_cpu_import_without_triton():
    assert resolve_backend("auto", torch.device("cpu")) == "jagged"
    assert resolve_backend("jagged", torch.device("cuda")) == "jagged"
    # importing the package (model, trainer) must not import Triton: it is loaded on first use only
    code = "import sys, mtfm, mtfm.model.mtfm, mtfm.train.trainer, mtfm.kernels; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "0"})


def test_model_with_triton_backend_matches_jagged():
    """A whole (tiny) model: loss and parameter gradients with attention_backend=triton equal jagged's."""
    from mtfm.model import MTFM
    from mtfm.model.testing import BatchShape, random_batch, tiny_config, tiny_schema

    schema = tiny_schema()
    batch = random_batch(schema, 3, seed=1, shape=BatchShape(history=5, realtime=4, exposures=2)).to(DEVICE)
    results = []
    for backend in ("jagged", "triton"):
        torch.manual_seed(0)
        config = tiny_config(attention_backend=backend, relative_time_bias=True, relative_position_bias=True,
                             num_heads=2, num_kv_groups=1).with_hta("(1:1)x1")
        model = MTFM(schema, config).to(DEVICE)
        loss = model.loss(batch, model(batch))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_j, grads_j), (loss_t, grads_t) = results
    torch.testing.assert_close(loss_t, loss_j, rtol=1e-5, atol=1e-6)
    assert grads_j.keys() == grads_t.keys()
    for name in grads_j:
        torch.testing.assert_close(grads_t[name], grads_j[name], rtol=1e-4, atol=1e-5, msg=name)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["all", "target"])
def test_triton_real_shapes_on_gpu(dtype, kind):
    """Paper-like heads (d 256, H 3, G 1, time and position bias) at hundreds to a thousand tokens per user."""
    _compare([(600, 100, 60), (200, 30, 10), (0, 0, 5), (900, 100, 24)], 3, 1, 256, 256, kind, (32, 16), 8, dtype, seed=0,
             base=1_700_000_000_000)


@gpu_only
def test_triton_gqa_real_shapes_on_gpu():
    _compare([(300, 40, 30), (500, 20, 12)], 8, 2, 64, 64, "all", (32, 0), 4, torch.bfloat16, seed=1)
