"""The contract every baseline model obeys, as small checks (used by ``test_baseline_*.py``).

A baseline is built as ``cls(schema, config)``, returns ``model(batch).logits[s]`` of shape
``[n_s, tasks_s]`` for every scenario of the batch, and ``model.loss(batch, out)``. The checks here
take a model (or an arch name and config) and assert one item of that contract each; the small
configurations the tests build the baselines with are in :data:`ARCHS`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel
from torch import nn
from train_fixtures import MemoryBatches, make_split

from mtfm.baselines.dcnv2 import DCNv2, DCNv2Config
from mtfm.baselines.mmoe import MMoEBaseline, MMoEConfig
from mtfm.baselines.mtgr import MTGR, MTGRConfig
from mtfm.baselines.onetrans import OneTrans, OneTransConfig
from mtfm.baselines.pepnet import PEPNet, PEPNetConfig
from mtfm.baselines.rankmixer import RankMixer, RankMixerConfig
from mtfm.baselines.star import STAR, STARConfig
from mtfm.config import DataSchema
from mtfm.data.batch import JaggedBatch
from mtfm.model.testing import tiny_config, tiny_schema
from mtfm.train.config import TrainConfig
from mtfm.train.models import build_model
from mtfm.train.trainer import fit

SCHEMA = tiny_schema()
INPUTS = {"embedding_dim": 4, "numeric_dim": 2, "sequence_dim": 8}


@contextmanager
def one_thread() -> Iterator[None]:
    """Run with one intra-op thread, restoring the count after: the baselines' tensors are tiny, and
    on a shared 2-core machine extra threads only contend (10-20x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_thread_fixture(scope: str = "module") -> Any:
    """An autouse fixture running its scope under :func:`one_thread`; assign it to a module name:
    ``_one_thread = one_thread_fixture()``."""

    @pytest.fixture(autouse=True, scope=scope)
    def _one_thread() -> Iterator[None]:
        with one_thread():
            yield

    return _one_thread


@dataclass(frozen=True)
class Arch:
    """One baseline's classes, the small configuration its tests use, and its contract thresholds."""

    name: str
    model_class: type[nn.Module]
    config_class: type[BaseModel]
    small: dict[str, Any]
    per_scenario: bool  # one independent network per scenario (no parameter shared between scenarios)
    eval_after_build: bool = False  # the model's tests score it in eval mode
    loss_steps: int = 25
    loss_lr: float = 1e-2
    loss_factor: float = 0.7
    loss_rows: int = 8  # users in the loss-falls batch
    loss_seed: int = 1
    round_trip: dict[str, Any] = field(default_factory=dict)  # overrides of the round-tripped config

    def config(self, **overrides: Any) -> BaseModel:
        """The small configuration with ``overrides`` (top-level keys replaced)."""
        return self.config_class.model_validate({**self.small, **overrides})

    def model(self, seed: int = 0, schema: DataSchema | None = None, **overrides: Any) -> nn.Module:
        """A small model for ``schema`` (default :func:`tiny_schema`), weights from ``seed``."""
        torch.manual_seed(seed)
        model = self.model_class(SCHEMA if schema is None else schema, self.config(**overrides))
        return model.eval() if self.eval_after_build else model


ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("dcnv2", DCNv2, DCNv2Config, dict(cross_layers=2, deep_hidden=[16, 8], inputs=INPUTS),
         per_scenario=True, round_trip={"cross": "mix"}),
    Arch("mmoe", MMoEBaseline, MMoEConfig,
         dict(num_experts=3, expert_hidden=[16], expert_dim=8, tower_hidden=[8], inputs=INPUTS), per_scenario=True),
    Arch("rankmixer", RankMixer, RankMixerConfig,
         dict(num_tokens=4, d_model=16, num_blocks=2, ffn_mult=2, tower_hidden=[8], inputs=INPUTS),
         per_scenario=True, loss_steps=15),
    Arch("mtgr", MTGR, MTGRConfig,
         dict(network=tiny_config(blocks=1, target_layers_per_block=0, full_layers_per_block=2)),
         per_scenario=True, loss_steps=15),
    Arch("onetrans", OneTrans, OneTransConfig,
         # max_history below random_batch's up to 12 H rows: the cap acts
         dict(d_model=16, num_heads=2, num_layers=3, embedding_dim=4, numeric_dim=2, tokenizer_hidden=[16],
              tower_hidden=[8], max_history=4),
         per_scenario=True, eval_after_build=True, loss_steps=8, loss_lr=2e-2, loss_rows=4, loss_seed=3),
    Arch("star", STAR, STARConfig, dict(star_hidden=[16, 8], aux_hidden=[8], scenario_dim=4, inputs=INPUTS),
         per_scenario=False, loss_factor=0.5),
    Arch("pepnet", PEPNet, PEPNetConfig, dict(tower_hidden=[16, 8], gate_hidden=8, scenario_dim=4, inputs=INPUTS),
         per_scenario=False, loss_factor=0.5),
)}


def assert_output_shapes(model: nn.Module, schema: DataSchema, batch: JaggedBatch) -> None:
    """``model(batch).logits`` has exactly the batch's scenarios, each ``[rows, tasks]`` and finite."""
    out = model(batch)
    assert set(out.logits) == set(batch.scenarios)
    for spec in schema.scenarios:
        assert out.logits[spec.name].shape == (batch.scenarios[spec.name].num_rows, len(spec.tasks))
        assert torch.isfinite(out.logits[spec.name]).all()


def assert_config_round_trips(arch: str, config: BaseModel, model_class: type[nn.Module],
                              schema: DataSchema = SCHEMA) -> None:
    """``config`` survives ``model_dump(mode="json")`` and back unchanged, and the registry's
    ``build_model(arch, <that json>, schema)`` builds a ``model_class`` holding an equal config."""
    dumped = config.model_dump(mode="json")
    assert type(config).model_validate(dumped) == config
    model = build_model(arch, dumped, schema)
    assert isinstance(model, model_class) and model.config == config


def assert_config_rejects(config_class: type[BaseModel], bad: dict[str, Any], match: str | None = None) -> None:
    """Validating ``bad`` as a ``config_class`` raises a ``ValueError`` (whose message matches ``match``)."""
    with pytest.raises(ValueError, match=match):
        config_class.model_validate(bad)


def assert_loss_falls(model: nn.Module, batch: JaggedBatch, steps: int, lr: float, factor: float) -> None:
    """``steps`` Adam steps (learning rate ``lr``) on one batch bring its loss below ``factor`` times
    the first loss: the loss is differentiable and its gradients reach parameters that can fit."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model.loss(batch, model(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < factor * losses[0], losses


def assert_no_shared_parameters(model: nn.Module) -> None:
    """No two scenario networks in ``model.scenarios`` hold the same parameter (by object or by
    storage), and every parameter of the model belongs to one of them."""
    owners: dict[int, str] = {}
    seen: set[int] = set()
    for name, sub in model.scenarios.items():
        for p in sub.parameters():
            assert id(p) not in seen, f"a parameter of {name} is also another scenario's"
            seen.add(id(p))
            owner = owners.setdefault(p.data_ptr(), name)
            assert owner == name, f"a parameter of {name} is also {owner}'s"
    assert len(owners) == sum(1 for _ in model.parameters())


def assert_scenarios_independent(model: nn.Module, batch: JaggedBatch, scenario: str,
                                 change: Callable[[JaggedBatch], None]) -> None:
    """Applying ``change`` (an in-place edit of ``scenario``'s features) to a copy of ``batch`` changes
    ``scenario``'s logits and leaves every other scenario's logits bit-for-bit equal."""
    changed = copy.deepcopy(batch)
    change(changed)
    with torch.no_grad():
        before, after = model(batch).logits, model(changed).logits
    assert not torch.allclose(before[scenario], after[scenario])
    others = [s for s in before if s != scenario]
    assert others
    for other in others:
        assert torch.equal(before[other], after[other]), other


def assert_learns_through_the_trainer(model: nn.Module, schema: DataSchema, arch: str, tmp_path: Path) -> None:
    """Four epochs of the real trainer on ``train_fixtures``' learnable data lower the train loss and
    reach a validation AUC above 0.6 on BIG's ctr (``model`` built for ``train_fixtures.tiny_schema()``)."""
    result = fit(model, MemoryBatches(make_split(schema, 15, seed=1), shuffle=True, seed=0),
                 MemoryBatches(make_split(schema, 6, seed=2), shuffle=False, seed=0), schema,
                 TrainConfig(epochs=4, lr=1e-2, progress=False), tmp_path, run_config={"arch": arch})
    history = result.metrics["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["valid"]["BIG"]["ctr"]["auc"] > 0.6
