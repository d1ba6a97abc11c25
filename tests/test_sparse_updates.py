"""Sparse (touched-rows-only) embedding updates equal dense ones where the math is the same.

The real model on real prepared batches (synthetic source -> prepare -> BatchLoader), trained a
few steps with the trainer's own optimizer factory and clipping, once with dense embedding
gradients and once with sparse ones, from the same initial weights.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mtfm.data.aggregate import prepare
from mtfm.data.loader import BatchLoader
from mtfm.data.sources.synthetic import load_source
from mtfm.model import MTFM
from mtfm.model.testing import tiny_config
from mtfm.train.config import TrainConfig
from mtfm.train.optim import clip_grad_norm, embedding_parameters, make_optimizers, use_sparse_embedding_gradients


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    prepare(load_source(None, None, 80, 0), out, shards=1, oracle_splits=())
    loader = BatchLoader(out, "train", 16, shuffle=False, seed=0, prefetch=0)
    batches = [b for _, b in zip(range(3), loader.iterate(0))]
    return loader.schema, batches


def _train(schema, batches, cfg: TrainConfig, sparse: bool, grad_clip: float | None = 1.0,
           eps: float | None = None) -> MTFM:
    torch.manual_seed(0)
    model = MTFM(schema, tiny_config()).double()
    if sparse:
        use_sparse_embedding_gradients(model)
    optimizers = make_optimizers(model, cfg)
    if eps is not None:
        for group in (g for opt in optimizers.values() for g in opt.param_groups):
            group["eps"] = eps
    for batch in batches:
        model.loss(batch, model(batch)).backward()
        if sparse:
            assert all(p.grad is None or p.grad.is_sparse for p in embedding_parameters(model))
        if grad_clip is not None:
            clip_grad_norm(model.parameters(), grad_clip)
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
    return model


def _touched_rows(model: MTFM, batches) -> list[dict[str, set[int]]]:
    """Per batch: table name -> the rows its sparse gradient holds (what the batch read)."""
    probe = copy.deepcopy(model)
    use_sparse_embedding_gradients(probe)
    names = {id(m.weight): n for n, m in probe.named_modules() if isinstance(m, torch.nn.Embedding)}
    touched = []
    for batch in batches:
        probe.zero_grad(set_to_none=True)
        probe.loss(batch, probe(batch)).backward()
        touched.append({names[id(p)]: set(p.grad.coalesce().indices()[0].tolist())
                        for p in embedding_parameters(probe) if p.grad is not None})
    return touched


def test_sparse_adagrad_equals_dense_adagrad_over_several_steps(world):
    """Adagrad leaves a row with a zero gradient unchanged, so skipping untouched rows changes nothing."""
    schema, batches = world
    cfg = TrainConfig(embedding_optimizer="adagrad", embedding_lr=0.05, lr=1e-3)
    dense = _train(schema, batches, cfg, sparse=False, grad_clip=0.5)  # a bound that clips: the norms must agree
    sparse = _train(schema, batches, cfg.model_copy(update={"sparse_embedding_updates": True}), sparse=True,
                    grad_clip=0.5)
    for (name, a), (_, b) in zip(dense.state_dict().items(), sparse.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_lazy_adam_equals_dense_adam_except_on_rows_a_step_skipped(world):
    """Lazy Adam (SparseAdam) and dense Adam agree on every dense parameter after two steps and
    on every row the second batch touched; a row only the first batch touched differs, since
    dense Adam still moves it by its momentum. So the test can fail both ways.

    SparseAdam adds eps after the bias correction, Adam before it, so with the default eps
    (1e-8) a gradient entry near 1e-7 gets a visibly different step; eps = 1e-30 makes both
    the exact Adam update and leaves only the difference that matters here."""
    schema, batches = world
    two = batches[:2]
    cfg = TrainConfig(embedding_optimizer="adam", lr=1e-2)
    dense = _train(schema, two, cfg, sparse=False, eps=1e-30)
    lazy = _train(schema, two, cfg.model_copy(update={"sparse_embedding_updates": True}), sparse=True, eps=1e-30)
    torch.manual_seed(0)
    start = MTFM(schema, tiny_config()).double()
    first, second = _touched_rows(start, two)
    table_names = set(first) | set(second)
    differing = 0
    for name, a in dense.state_dict().items():
        b = lazy.state_dict()[name]
        table = name.removesuffix(".weight")
        if table not in table_names:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
            continue
        rows = sorted(second.get(table, set()))
        torch.testing.assert_close(a[rows], b[rows], rtol=1e-10, atol=1e-12, msg=name)
        skipped = sorted(first.get(table, set()) - second.get(table, set()))
        if skipped:
            assert not torch.equal(a[skipped], b[skipped]), name
            differing += 1
        never = [r for r in range(a.shape[0]) if r not in first.get(table, set()) | second.get(table, set())]
        torch.testing.assert_close(a[never], b[never], rtol=0, atol=0, msg=name)  # both leave them at init
    assert differing > 0  # the worlds' batches do skip rows, so the difference is real and detected


def test_clip_grad_norm_with_sparse_gradients_matches_the_dense_clip(world):
    schema, batches = world
    grads = {}
    for sparse in (False, True):
        torch.manual_seed(0)
        model = MTFM(schema, tiny_config()).double()
        if sparse:
            use_sparse_embedding_gradients(model)
        model.loss(batches[0], model(batches[0])).backward()
        total = clip_grad_norm(model.parameters(), 0.1)
        grads[sparse] = (total, {n: p.grad.to_dense() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(grads[True][0], grads[False][0])
    assert float(grads[False][0]) > 0.1  # it did clip
    for name, g in grads[False][1].items():
        torch.testing.assert_close(grads[True][1][name], g, msg=name)


def test_sparse_updates_need_the_embeddings_own_optimizer():
    with pytest.raises(ValueError, match="sparse_embedding_updates needs the embeddings' own optimizer"):
        TrainConfig(sparse_embedding_updates=True)
