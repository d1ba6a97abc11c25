"""2:4 pruning of the attention projections and bf16 inference (issue 12 item 6)."""

from __future__ import annotations

import pytest
import torch

from mtfm.model import MTFM
from mtfm.model.testing import random_batch, tiny_config, tiny_schema
from mtfm.serve.sparsity import attention_projections, mask_2_4, prune_2_4, to_semi_structured
from mtfm.train.evaluate import predict

SCHEMA = tiny_schema()


def _model(hta: str = "(1:1)x2") -> MTFM:
    torch.manual_seed(0)
    return MTFM(SCHEMA, tiny_config().with_hta(hta)).eval()


def _reference_mask(w: torch.Tensor) -> torch.Tensor:
    """Plain loops: per row, per group of 4 inputs, keep the two largest |w| (lower index on ties)."""
    mask = torch.zeros_like(w, dtype=torch.bool)
    for r in range(w.shape[0]):
        for g in range(0, w.shape[1], 4):
            order = sorted(range(4), key=lambda i: (-abs(float(w[r, g + i].detach())), i))
            for i in order[:2]:
                mask[r, g + i] = True
    return mask


def test_the_mask_keeps_exactly_two_of_every_four_and_the_largest():
    w = torch.randn(12, 32, generator=torch.Generator().manual_seed(1))
    mask = mask_2_4(w)
    assert mask.reshape(12, 8, 4).sum(-1).eq(2).all()
    assert torch.equal(mask, _reference_mask(w))


def test_the_mask_refuses_ragged_input_dims():
    with pytest.raises(ValueError, match="input dim 6 is not a multiple of 4"):
        mask_2_4(torch.randn(3, 6))


@pytest.mark.parametrize("hta", ["(1:1)x2", "(2:0)x1"])
def test_pruned_model_equals_a_reference_masked_matmul_and_leaves_the_original(hta):
    model = _model(hta)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, report = prune_2_4(model)
    names = set(attention_projections(model))
    assert names and {n.rsplit(".", 1)[1] for n in names} >= {"f2"}
    assert report.sparsity == pytest.approx(0.5) and all(s == pytest.approx(0.5) for s in report.per_layer.values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for name, linear in attention_projections(pruned).items():
        orig = attention_projections(model)[name]
        xin = torch.randn(5, orig.in_features)
        ref = xin @ (orig.weight * _reference_mask(orig.weight)).T + orig.bias
        torch.testing.assert_close(linear(xin), ref, rtol=1e-6, atol=1e-6)
    batch = random_batch(SCHEMA, 3, seed=2)
    dense, sparse = model(batch).logits, pruned(batch).logits
    assert any(not torch.allclose(dense[s], sparse[s]) for s in dense if dense[s].numel())


def test_bf16_predictions_are_close_to_fp32():
    model = _model()
    batches = [random_batch(SCHEMA, 4, seed=s) for s in range(3)]
    names = {s.name: s.task_names for s in SCHEMA.scenarios}
    fp32 = predict(model, batches, torch.device("cpu"), names)
    bf16 = predict(model, batches, torch.device("cpu"), names, bf16=True)
    for s in names:
        assert fp32[s].probs.size
        diff = abs(fp32[s].probs - bf16[s].probs).max()
        assert 0 < diff < 2e-2, (s, diff)  # bf16 has 8 mantissa bits: ~1e-2 on a probability, not 0


def test_semi_structured_refuses_cpu_weights_by_name():
    pruned, _ = prune_2_4(_model())
    with pytest.raises(RuntimeError, match=r"\.weight is on cpu; the 2:4 sparse kernels need CUDA"):
        to_semi_structured(pruned)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 sparse kernels need CUDA")
def test_semi_structured_projections_match_the_dense_pruned_ones_on_cuda():
    torch.manual_seed(0)
    model = MTFM(SCHEMA, tiny_config(d_model=128, num_heads=2)).eval()
    pruned, _ = prune_2_4(model)
    pruned = pruned.cuda()
    dense = {n: (l.weight.detach().bfloat16().clone(), l.bias.detach().bfloat16().clone())
             for n, l in attention_projections(pruned).items()}
    to_semi_structured(pruned)
    for name, linear in attention_projections(pruned).items():
        x = torch.randn(64, linear.in_features, device="cuda", dtype=torch.bfloat16)
        w, b = dense[name]
        torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, w, b), rtol=2e-2, atol=2e-2)


def test_evaluate_precision_bf16_writes_its_own_file_close_to_fp32(tmp_path_factory):
    """``mtfm evaluate --precision bf16`` on a tiny trained run: its own JSON beside the fp32
    one (which it must leave as it was), with loglosses within bf16 rounding of fp32's (not
    AUCs: a two-step model's scores are near-ties, which bf16 rounding reorders)."""
    import json

    from safety_helpers import make_synthetic, train_args

    from mtfm.cli import main

    one, _, model = make_synthetic(tmp_path_factory)
    run = tmp_path_factory.mktemp("bf16") / "run"
    assert main(train_args(one, run, model, "--max-steps", "2")) == 0
    assert main(["evaluate", "--run", str(run), "--data", str(one), "--split", "valid"]) == 0
    before = (run / "eval_valid.json").read_text()
    assert main(["evaluate", "--run", str(run), "--data", str(one), "--split", "valid", "--precision", "bf16"]) == 0
    assert (run / "eval_valid.json").read_text() == before
    fp32, bf16 = json.loads(before), json.loads((run / "eval_valid_bf16.json").read_text())
    pairs = [(fp32[s][t]["logloss"], bf16[s][t]["logloss"]) for s in fp32 for t in fp32[s]]
    assert pairs and all(a != b and b == pytest.approx(a, rel=2e-2) for a, b in pairs), pairs
