"""Feature embeddings: categorical lookups, pooled multi-valued lookups, numeric encoders.

One :class:`FeatureEmbeddings` owns every table of a model, so each weight has exactly one
owner (checkpoints stay free of aliased tensors and a sharded collection such as torchrec's
``EmbeddingCollection`` can replace it behind the same ``embed(field, features)`` call).

A *field* is one place features come from: a history type (``H:<name>``), a real-time type
(``R:<name>``) or one part of a scenario (``T:<scenario>:user|cross|item``). Features map to
tables as the schema declares (:mod:`mtfm.sharing`): features with the same ``share`` name read
one table (e.g. ``item_id`` in a history sequence and in a scenario's item features, so a target
item and the same item in the history start from one vector), named after the share name; a
feature without ``share`` has its own table, named ``<field>__<feature>``. Numeric features
(normalised at prepare time) each get a small linear encoder.

Bad ids are never clipped: an id outside ``[0, cardinality)`` is an error naming the field,
feature and row.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtfm.config import CategoricalFeature, Feature, MultiCategoricalFeature, NumericFeature
from mtfm.data.batch import FeatureTensors


def module_key(*parts: str) -> str:
    """A ``ModuleDict`` key from names that may hold any character ("." is not allowed there)."""
    return "__".join(re.sub(r"[^A-Za-z0-9_]", "_", p) for p in parts)


def describe_field(field: str) -> str:
    """``T:HP:item`` -> ``scenario 'HP' item features`` (for error messages)."""
    kind, _, rest = field.partition(":")
    if kind == "H":
        return f"history sequence {rest!r}"
    if kind == "R":
        return f"real-time sequence {rest!r}"
    scenario, _, part = rest.partition(":")
    return f"scenario {scenario!r} {part} features"


class FeatureEmbeddings(nn.Module):
    """All embedding tables and numeric encoders of a model, addressed by field."""

    def __init__(self, fields: dict[str, list[Feature]], embedding_dim: int, numeric_dim: int) -> None:
        super().__init__()
        empty = [f for f, features in fields.items() if not features]
        if empty:
            raise ValueError(f"embedding fields without features: {empty} (leave them out instead)")
        self.fields = {f: list(features) for f, features in fields.items()}
        self.numeric_dim = numeric_dim
        self.tables = nn.ModuleDict()
        self.numeric = nn.ModuleDict()
        self.table_of: dict[tuple[str, str], str] = {}
        by_share: dict[str, tuple[str, int, int]] = {}  # share name -> (table key, rows, width)
        for field, features in self.fields.items():
            for feat in features:
                if isinstance(feat, NumericFeature):
                    self.numeric[module_key(field, feat.name)] = nn.Linear(1, numeric_dim)
                    continue
                dim = feat.embedding_dim or embedding_dim
                if feat.share is not None and feat.share in by_share:
                    key, rows, width = by_share[feat.share]
                    if (rows, width) != (feat.cardinality, dim):  # the schema validates this; fields built by hand
                        raise ValueError(
                            f"{describe_field(field)}: feature {feat.name!r} declares share {feat.share!r} with "
                            f"{feat.cardinality} rows x {dim}, but the table has {rows} x {width}"
                        )
                    self.table_of[(field, feat.name)] = key
                    continue
                key = module_key(feat.share) if feat.share is not None else module_key(field, feat.name)
                while key in self.tables or hasattr(self.tables, key):  # taken, or a ModuleDict attribute ("items")
                    key += "_"
                self.tables[key] = nn.Embedding(feat.cardinality, dim)
                nn.init.normal_(self.tables[key].weight, std=0.05)
                self.table_of[(field, feat.name)] = key
                if feat.share is not None:
                    by_share[feat.share] = (key, feat.cardinality, dim)

    def out_dim(self, field: str) -> int:
        """Width of ``embed(field, ...)``: the concatenation of the field's feature vectors."""
        total = 0
        for feat in self.fields[field]:
            if isinstance(feat, NumericFeature):
                total += self.numeric_dim
            else:
                total += self.tables[self.table_of[(field, feat.name)]].embedding_dim
        return total

    def embed(self, field: str, features: FeatureTensors, num_rows: int) -> Tensor:
        """``[num_rows, out_dim(field)]``: every feature of the field, in schema order, concatenated."""
        check_columns(describe_field(field), self.fields[field], features)
        return torch.cat([self.embed_feature(field, feat, features, num_rows) for feat in self.fields[field]], dim=1)

    def embed_feature(self, field: str, feat: Feature, features: FeatureTensors, num_rows: int) -> Tensor:
        """``[num_rows, width]``: one feature of a field (its table row, pooled bag, or numeric encoding)."""
        if not torch.compiler.is_exporting():  # a traced graph cannot raise on values: mtfm.serve.export checks on the host
            check_feature_values(field, feat, features, num_rows)
        if isinstance(feat, NumericFeature):
            encoder: nn.Linear = self.numeric[module_key(field, feat.name)]
            return encoder(features.numeric[feat.name].to(encoder.weight.dtype)[:, None])
        table: nn.Embedding = self.tables[self.table_of[(field, feat.name)]]
        if isinstance(feat, MultiCategoricalFeature):
            values, offsets = features.multi[feat.name]
            return F.embedding_bag(values, table.weight, offsets, mode=feat.pooling, include_last_offset=True,
                                   sparse=table.sparse)
        return table(features.categorical[feat.name])

    def subset(self, fields: list[str]) -> "FeatureEmbeddings":
        """A collection over ``fields`` only that shares (does not copy) the tables and encoders it needs."""
        unknown = [f for f in fields if f not in self.fields]
        if unknown:
            raise KeyError(f"unknown embedding fields {unknown}; known: {sorted(self.fields)}")
        new = FeatureEmbeddings.__new__(FeatureEmbeddings)
        nn.Module.__init__(new)
        new.fields = {f: self.fields[f] for f in fields}
        new.numeric_dim = self.numeric_dim
        new.table_of = {k: v for k, v in self.table_of.items() if k[0] in new.fields}
        new.tables = nn.ModuleDict({key: self.tables[key] for key in dict.fromkeys(new.table_of.values())})
        new.numeric = nn.ModuleDict(
            {module_key(f, feat.name): self.numeric[module_key(f, feat.name)]
             for f in fields for feat in self.fields[f] if isinstance(feat, NumericFeature)}
        )
        return new


def check_columns(where: str, features: list[Feature], given: FeatureTensors) -> None:
    """The batch must carry exactly the schema's features of this field, each under its kind."""
    want = {
        "categorical": [f.name for f in features if isinstance(f, CategoricalFeature)],
        "numeric": [f.name for f in features if isinstance(f, NumericFeature)],
        "multi": [f.name for f in features if isinstance(f, MultiCategoricalFeature)],
    }
    for kind, names in want.items():
        have = getattr(given, kind)
        missing = [n for n in names if n not in have]
        extra = [n for n in have if n not in names]
        if missing or extra:
            raise ValueError(
                f"{where}: {kind} features in the batch {sorted(have)} do not match the schema's {names}"
                + (f"; missing {missing}" if missing else "")
                + (f"; not in the schema {extra}" if extra else "")
            )


def check_feature_values(field: str, feat: Feature, features: FeatureTensors, num_rows: int) -> None:
    """The values of one feature of ``field`` must be embeddable: ids in range, finite numbers,
    well-formed bags, one row each. The error names the field, the feature and the first bad row."""
    where = describe_field(field)
    if isinstance(feat, NumericFeature):
        _checked_numeric(where, feat.name, features.numeric[feat.name], num_rows)
    elif isinstance(feat, MultiCategoricalFeature):
        values, offsets = features.multi[feat.name]
        _check_bags(where, feat.name, values, offsets, num_rows)
        _check_ids(where, feat.name, values, feat.cardinality)
    else:
        ids = features.categorical[feat.name]
        _check_rows(where, feat.name, ids, num_rows)
        _check_ids(where, feat.name, ids, feat.cardinality)


def _check_rows(where: str, name: str, values: Tensor, num_rows: int) -> None:
    if values.dim() != 1 or values.shape[0] != num_rows:
        raise ValueError(f"{where}: feature {name!r} has shape {tuple(values.shape)}, expected [{num_rows}]")


def _check_ids(where: str, name: str, ids: Tensor, cardinality: int) -> None:
    if ids.numel() == 0:
        return
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{where}: feature {name!r} ids must be integers, got {ids.dtype}")
    bad = (ids < 0) | (ids >= cardinality)
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"{where}: feature {name!r}: id {int(ids[row])} at row {row} is outside [0, {cardinality})"
        )


def _check_bags(where: str, name: str, values: Tensor, offsets: Tensor, num_rows: int) -> None:
    if offsets.dim() != 1 or offsets.shape[0] != num_rows + 1:
        raise ValueError(f"{where}: feature {name!r} offsets have shape {tuple(offsets.shape)}, expected [{num_rows + 1}]")
    if (int(offsets[0]) != 0 or int(offsets[-1]) != values.shape[0]):
        raise ValueError(
            f"{where}: feature {name!r} offsets must run from 0 to {values.shape[0]} (the number of values), "
            f"got {int(offsets[0])}..{int(offsets[-1])}"
        )
    if num_rows > 0 and bool((offsets[1:] < offsets[:-1]).any()):
        row = int(torch.nonzero(offsets[1:] < offsets[:-1])[0])
        raise ValueError(f"{where}: feature {name!r} offsets decrease at row {row}")


def _checked_numeric(where: str, name: str, values: Tensor, num_rows: int) -> Tensor:
    _check_rows(where, name, values, num_rows)
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0])
        raise ValueError(f"{where}: numeric feature {name!r} is {float(values[row])} at row {row}; expected a finite number")
    return values
