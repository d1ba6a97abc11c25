"""One feature template for all scenarios: what a classic multi-scenario model needs and MTFM does not.

STAR and PEPNet (:mod:`mtfm.baselines.star`, :mod:`mtfm.baselines.pepnet`) feed every
exposure of every scenario through one network, so every exposure must be one vector of one
layout. The scenarios' schemas differ (paper section 3.1), so they are aligned to a template
first; this module is that alignment, kept visible so its cost can be seen
(:func:`describe_template` prints it, with how much of each scenario's row is filler).

**Alignment policy** (exactly what :func:`align_schema` and :class:`AlignedInputs` do):

1. The template is the union of the scenarios' user, cross and item features (schema order:
   parts user, cross, item; within a part, first appearance over the scenarios in schema
   order). Vector features count as the columns they expand to.
2. A feature with the same part, name, kind and table (cardinality, embedding width, declared
   ``share``, multi-valued pooling) in several scenarios is **one column** with one embedding
   table (or one numeric encoder): e.g. ``item.cuisine`` in every scenario. Its ids are
   assumed to mean the same thing in every scenario (rename a feature to keep it apart).
3. Any other feature is its **own column**; a name that ends up in several columns is
   suffixed with the scenarios that fill each (``item.brand@A``, ``item.brand@B``).
4. A column's table follows the schema's declared ``share`` names, as in MTFM: the item-id
   column reads the same table as the behaviour sequences' item ids.
5. In a scenario that lacks a column, the value is **missing**:

   * categorical -> a learned missing embedding of the column (one vector, like an extra row);
   * numeric -> value 0 plus a missing indicator (the encoder reads ``[value, missing]``);
   * multi-categorical -> a learned missing vector of the column (an empty bag that is told
     apart from a present but empty list, which pools to zeros).

6. Behaviour sequences (H and R) are shared by all scenarios already; each exposure pools the
   rows it may see with one :class:`~mtfm.baselines.common.SequencePooling` (one set of
   embedding tables and key projections for all scenarios; the DIN query is the exposure's
   aligned item embedding, projected by common's per-scenario query layer).

Every scenario's exposure is thus a vector of the same width (:attr:`AlignedInputs.out_dim`),
whatever its scenario; the columns it does not fill carry only constants.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

import torch
from torch import Tensor, nn

from mtfm.baselines.common import SCENARIO_PARTS, InputConfig, SequencePooling
from mtfm.config import CategoricalFeature, DataSchema, Feature, MultiCategoricalFeature, NumericFeature
from mtfm.data.batch import FeatureTensors, JaggedBatch
from mtfm.model.embedding import FeatureEmbeddings, module_key


@dataclass(frozen=True)
class AlignedColumn:
    """One column of the template: a feature, and the scenarios whose rows fill it."""

    name: str  # unique, "<part>.<feature>" (suffixed "@S1+S2" when the feature name is in several columns)
    part: str  # user / cross / item
    feature: Feature  # the feature as the (first) filling scenario declares it
    scenarios: tuple[str, ...]  # scenarios that fill it, schema order

    @property
    def kind(self) -> str:
        return self.feature.kind

    @property
    def field(self) -> str:
        """This column's embedding field in :class:`FeatureEmbeddings`."""
        return f"A:{self.name}"


@dataclass(frozen=True)
class AlignedTemplate:
    """The aligned template of a schema (:func:`align_schema`)."""

    scenarios: tuple[str, ...]
    columns: tuple[AlignedColumn, ...]

    def part(self, part: str) -> list[AlignedColumn]:
        return [c for c in self.columns if c.part == part]

    def filled(self, scenario: str) -> list[AlignedColumn]:
        return [c for c in self.columns if scenario in c.scenarios]

    def shared(self) -> list[AlignedColumn]:
        """Columns filled by more than one scenario."""
        return [c for c in self.columns if len(c.scenarios) > 1]


def _identity(part: str, feature: Feature) -> tuple:
    """What makes two scenarios' features one column: part, name, kind and the table's shape."""
    if isinstance(feature, NumericFeature):
        return (part, feature.name, feature.kind)
    pooling = feature.pooling if isinstance(feature, MultiCategoricalFeature) else None
    return (part, feature.name, feature.kind, feature.cardinality, feature.embedding_dim, feature.share, pooling)


def align_schema(schema: DataSchema) -> AlignedTemplate:
    """The template of ``schema`` under the module's alignment policy (rules 1-3)."""
    found: dict[tuple, tuple[Feature, list[str]]] = {}
    for part in SCENARIO_PARTS:
        for spec in schema.scenarios:
            for feature in spec.feature_groups[part]:
                if not isinstance(feature, (CategoricalFeature, MultiCategoricalFeature, NumericFeature)):
                    raise TypeError(f"scenario {spec.name!r}: cannot align feature {feature.name!r} "
                                    f"of kind {feature.kind}")
                key = _identity(part, feature)
                found.setdefault(key, (feature, []))[1].append(spec.name)
    names = [f"{key[0]}.{key[1]}" for key in found]
    columns = []
    for base, (key, (feature, scenarios)) in zip(names, found.items()):
        name = base if names.count(base) == 1 else f"{base}@{'+'.join(scenarios)}"
        columns.append(AlignedColumn(name, key[0], feature, tuple(scenarios)))
    return AlignedTemplate(tuple(schema.scenario_names), tuple(columns))


def describe_template(template: AlignedTemplate) -> str:
    """The template as a table: every column, its kind and table size, which scenarios fill it
    and in which it is missing; then how much of each scenario's row is real."""
    total = len(template.columns)
    lines = [f"aligned template: {total} columns for scenarios {', '.join(template.scenarios)} "
             f"({len(template.shared())} shared by several scenarios)"]
    width = max([len(c.name) for c in template.columns] + [6])
    lines.append(f"  {'column':<{width}}  {'kind':<17}  {'rows':>7}  filled by / missing in")
    for c in template.columns:
        rows = "-" if isinstance(c.feature, NumericFeature) else str(c.feature.cardinality)
        missing = [s for s in template.scenarios if s not in c.scenarios]
        lines.append(f"  {c.name:<{width}}  {c.kind:<17}  {rows:>7}  {', '.join(c.scenarios)}"
                     + (f" / missing in {', '.join(missing)}" if missing else " / -"))
    for s in template.scenarios:
        n = len(template.filled(s))
        lines.append(f"  scenario {s}: fills {n} of {total} columns ({100 * n / max(total, 1):.0f}%), "
                     f"{total - n} missing")
    return "\n".join(lines)


def print_template(schema: DataSchema, file: TextIO | None = None) -> AlignedTemplate:
    """Print the aligned template of ``schema`` (:func:`describe_template`) and return it."""
    template = align_schema(schema)
    print(describe_template(template), file=file or sys.stdout)
    return template


class TaskColumns(nn.Module):
    """Each scenario's tasks as columns of one list of task names, for models with one head per task name.

    :attr:`task_names` is the union of the scenarios' task names (first appearance, schema order);
    :attr:`scenario_index` numbers the scenarios in schema order. Calling the module with a scenario
    name gives that scenario's task columns (its tasks in schema order) as a long tensor, kept in
    non-persistent buffers ``tasks_{i}`` so that it moves with the model and is not in its state dict.
    """

    def __init__(self, schema: DataSchema) -> None:
        super().__init__()
        self.scenario_index = {name: i for i, name in enumerate(schema.scenario_names)}
        self.task_names = list(dict.fromkeys(t for s in schema.scenarios for t in s.task_names))
        for i, spec in enumerate(schema.scenarios):
            self.register_buffer(f"tasks_{i}", torch.tensor([self.task_names.index(t) for t in spec.task_names]),
                                 persistent=False)

    def forward(self, scenario: str) -> Tensor:
        return getattr(self, f"tasks_{self.scenario_index[scenario]}")


class AlignedInputs(nn.Module):
    """Every scenario's exposures encoded in the one template (policy rules 4-6).

    :meth:`forward` gives, per scenario in the batch, the named parts ``user``, ``cross``,
    ``item`` (each the concatenation of that part's column vectors in template order; parts
    with no column in the template left out) and ``sequences`` (when the schema has any), of
    the same widths :attr:`part_dims` for every scenario. :attr:`field_dims` lists the width
    of every column (then every pooled sequence type), the feature fields of PEPNet's gates.
    """

    def __init__(self, schema: DataSchema, config: InputConfig) -> None:
        super().__init__()
        self.template = align_schema(schema)
        self.config = config
        fields: dict[str, list[Feature]] = {f"H:{s.name}": list(s.features) for s in schema.history}
        fields.update({f"R:{s.name}": list(s.features) for s in schema.realtime})
        lookups = [c for c in self.template.columns if not isinstance(c.feature, NumericFeature)]
        fields.update({c.field: [c.feature] for c in lookups})
        self.embeddings = FeatureEmbeddings(fields, config.embedding_dim, config.numeric_dim)
        self.numeric = nn.ModuleDict({module_key(c.name): nn.Linear(2, config.numeric_dim)
                                      for c in self.template.columns if isinstance(c.feature, NumericFeature)})
        self.missing = nn.ParameterDict()
        for c in lookups:
            if len(c.scenarios) < len(self.template.scenarios):
                self.missing[module_key(c.name)] = nn.Parameter(torch.randn(self.embeddings.out_dim(c.field)) * 0.05)
        self.column_dims = {c.name: self._column_dim(c) for c in self.template.columns}
        self.part_dims = {p: sum(self.column_dims[c.name] for c in self.template.part(p)) for p in SCENARIO_PARTS}
        self.part_dims = {p: d for p, d in self.part_dims.items() if d > 0}
        self.field_dims = [self.column_dims[c.name] for c in self.template.columns]
        self.pooling: SequencePooling | None = None
        if schema.history or schema.realtime:
            if "item" not in self.part_dims:
                raise ValueError("sequence pooling needs item columns for its query")
            query_dims = {s: self.part_dims["item"] for s in self.template.scenarios}
            self.pooling = SequencePooling(schema, self.embeddings, query_dims, config.sequence_dim,
                                           config.history_pooling)
            self.part_dims["sequences"] = self.pooling.out_dim
            per_type = self.pooling.out_dim // max(len(self.pooling.types), 1)
            self.field_dims += [per_type] * len(self.pooling.types)

    @property
    def out_dim(self) -> int:
        return sum(self.part_dims.values())

    def _column_dim(self, column: AlignedColumn) -> int:
        if isinstance(column.feature, NumericFeature):
            return self.config.numeric_dim
        return self.embeddings.out_dim(column.field)

    def column(self, column: AlignedColumn, scenario: str, features: FeatureTensors, n: int) -> Tensor:
        """``[n, dim]``: the column's value for ``n`` rows of ``scenario`` (missing when it does not fill it)."""
        name, present = column.feature.name, scenario in column.scenarios
        if isinstance(column.feature, NumericFeature):
            encoder: nn.Linear = self.numeric[module_key(column.name)]
            x = torch.zeros(n, 2, dtype=encoder.weight.dtype, device=encoder.weight.device)
            if present:
                x[:, 0] = features.numeric[name].to(encoder.weight.dtype)
            else:
                x[:, 1] = 1.0
            return encoder(x)
        if not present:
            return self.missing[module_key(column.name)].expand(n, -1)
        one = FeatureTensors()
        if isinstance(column.feature, MultiCategoricalFeature):
            one.multi[name] = features.multi[name]
        else:
            one.categorical[name] = features.categorical[name]
        return self.embeddings.embed(column.field, one, n)

    def scenario_parts(self, batch: JaggedBatch, scenario: str) -> dict[str, Tensor]:
        """The template's ``user`` / ``cross`` / ``item`` parts of one scenario's exposures."""
        sc = batch.scenarios[scenario]
        out = {}
        for part in self.part_dims:
            if part == "sequences":
                continue
            features = getattr(sc, part)
            columns = self.template.part(part)
            out[part] = torch.cat([self.column(c, scenario, features, sc.num_rows) for c in columns], 1)
        return out

    def forward(self, batch: JaggedBatch) -> dict[str, dict[str, Tensor]]:
        """scenario -> part -> ``[n_s, part_dims[part]]`` for every scenario of the batch."""
        encoded = self.pooling.encode_sequences(batch) if self.pooling is not None else {}
        out = {}
        for scenario in batch.scenarios:
            if scenario not in self.template.scenarios:
                raise KeyError(f"batch has scenario {scenario!r}; this model was built for "
                               f"{list(self.template.scenarios)}")
            parts = self.scenario_parts(batch, scenario)
            if self.pooling is not None:
                parts["sequences"] = self.pooling(batch, scenario, parts["item"], encoded)
            out[scenario] = parts
        return out
