"""Fused Group LayerNorm (mtfm.kernels.triton_gln) against GroupLayerNorm's PyTorch path.

Without CUDA the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set before
Triton is imported) at small shapes; skipped when Triton is not installed.
"""

from __future__ import annotations

import os

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

from mtfm.kernels import triton_attention  # noqa: E402
from mtfm.kernels.triton_gln import fused_group_layer_norm  # noqa: E402
from mtfm.model.layers import GroupLayerNorm  # noqa: E402

DEVICE = "cuda" if CUDA and not triton_attention.interpreting() else "cpu"


def _reference(x, gid, weight, bias, eps):
    """GroupLayerNorm's PyTorch path (the module's own code, with the fused hook bypassed)."""
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps) * weight.index_select(0, gid) \
        + bias.index_select(0, gid)


def _compare(rows: int, dim: int, groups: int, dtype: torch.dtype, seed: int, runs: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, dim, generator=g) * 3 + 1).to(DEVICE, dtype).requires_grad_()
    if runs:  # token layouts: runs of one group, as (H; R; T) sequences give
        gid = torch.randint(0, groups, (rows,), generator=g).sort().values
    else:
        gid = torch.randint(0, groups, (rows,), generator=g)
    gid = gid.to(DEVICE)
    weight = (1 + 0.5 * torch.randn(groups, dim, generator=g)).to(DEVICE).requires_grad_()
    bias = (0.5 * torch.randn(groups, dim, generator=g)).to(DEVICE).requires_grad_()
    dy = torch.randn(rows, dim, generator=g).to(DEVICE)

    y = fused_group_layer_norm(x, gid, weight, bias, 1e-6)
    grads = torch.autograd.grad((y.float() * dy).sum(), (x, weight, bias))
    ref_in = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    ref = _reference(ref_in[0], gid, ref_in[1], ref_in[2], 1e-6)
    ref_grads = torch.autograd.grad((ref * dy.double()).sum(), ref_in)

    assert y.dtype == torch.promote_types(dtype, torch.float32) and y.shape == x.shape
    rel = 2e-5 if dtype == torch.float32 else 2e-2
    for name, got, want in [("y", y, ref), ("dx", *grads[:1], ref_grads[0]), ("dw", grads[1], ref_grads[1]),
                            ("db", grads[2], ref_grads[2])]:
        want = want.detach()
        scale = max(float(want.abs().max()) if want.numel() else 0.0, 1.0)
        err = float((got.detach().double() - want).abs().max()) if want.numel() else 0.0
        assert err <= rel * scale, f"{name}: max |fused - reference| = {err:.3g} > {rel * scale:.3g}"


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(0, 23), dim=st.sampled_from([1, 8, 24, 64]), groups=st.integers(1, 5),
       runs=st.booleans(), seed=st.integers(0, 10_000))
def test_fused_gln_matches_reference_fp32(rows, dim, groups, runs, seed):
    _compare(rows, dim, groups, torch.float32, seed, runs)


@settings(max_examples=4, deadline=None)
@given(rows=st.integers(1, 17), groups=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_fused_gln_matches_reference_bf16(rows, groups, seed):
    _compare(rows, 32, groups, torch.bfloat16, seed)


def test_fused_gln_rejects_bad_shapes():
    x = torch.zeros(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="num_groups, 8"):
        fused_group_layer_norm(x, torch.zeros(3, dtype=torch.long, device=DEVICE), torch.ones(2, 4, device=DEVICE),
                               torch.ones(2, 4, device=DEVICE), 1e-6)


def test_group_layer_norm_module_uses_the_kernel_only_on_cuda():
    """The module's hook: CPU stays on the PyTorch path; on CUDA the fused kernel gives the same result."""
    gln = GroupLayerNorm(["a", "b", "c"], 16)
    with torch.no_grad():
        for p in gln.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(10, 16)
    gid = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0, 1, 2])
    weight, bias = gln.affine()
    torch.testing.assert_close(gln(x, gid), _reference(x, gid, weight, bias, gln.eps))
    if DEVICE == "cuda":
        gpu = gln.to("cuda")
        torch.testing.assert_close(gpu(x.cuda(), gid.cuda()).cpu(), _reference(x, gid, weight, bias, gln.eps),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (real shapes are too slow for the interpreter)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_gln_real_shapes_on_gpu(dtype):
    _compare(50_000, 768, 9, dtype, seed=0, runs=True)
    _compare(4_097, 1000, 3, dtype, seed=1)
