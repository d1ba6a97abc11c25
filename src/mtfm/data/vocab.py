"""Vocabularies built on the train split (``vocabulary: train``), with an out-of-vocabulary id.

A categorical or multi-categorical feature declared with ``vocabulary: train`` (optionally
``vocabulary_min_count: N`` and ``vocabulary_max_size: M``) gets its vocabulary from ``mtfm
prepare``: the values of the train split's rows (exposures whose window starts before the
valid boundary, after the drop policy; behaviour rows before it), the most frequent first, ties
broken by value (ascending), values seen fewer than ``min_count`` times left out, at most
``max_size`` kept. Features sharing a table (``share:``) get one vocabulary, built over all of
their train values (a column read by several sequence types of one table is counted once).

The built list is written into the prepared data's schema (``manifest.json``) as an ordinary
``vocabulary: [...]``: id = position + 1, id 0 = out of vocabulary (a value only seen in
valid/test, or at serving). Training, evaluation, checkpoints and ``build_request`` all read that
schema, so every stage maps a value to the same id. ``manifest.json`` ``vocabularies`` reports,
per vocabulary, its size and each split's values and out-of-vocabulary share.

Integer columns keep integer vocabularies; text (or a mix of integer and text columns under one
share name) gives text, compared as text (:func:`mtfm.data.encode.encode_ids`). Counting is one
polars ``value_counts`` over the concatenated values (no per-row Python).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from mtfm.config import CategoricalFeature, DataSchema, MultiCategoricalFeature, schema_from_dict
from mtfm.data.validate import DataError

SPLIT_NAMES = ("train", "valid", "test")


class SplitOOV(BaseModel):
    model_config = ConfigDict(extra="forbid")

    values: int  # values of the split's rows (list elements counted one by one)
    oov: int  # of which out of vocabulary (id 0)

    @property
    def share(self) -> float:
        return self.oov / self.values if self.values else 0.0


class VocabularyInfo(BaseModel):
    """What prepare built for one ``vocabulary: train`` (recorded in ``manifest.json``)."""

    model_config = ConfigDict(extra="forbid")

    features: list[str]  # schema paths of the features reading it
    size: int  # values in the vocabulary: ids 1..size, id 0 = out of vocabulary
    min_count: int
    max_size: int | None = None
    train_distinct: int  # distinct values in the train split (before min_count / max_size)
    splits: dict[str, SplitOOV] = Field(default_factory=dict)


@dataclass
class VocabularySource:
    """One column feeding a vocabulary: its values (list column for multi-categorical
    features) and each row's split (0 train, 1 valid, 2 test)."""

    path: str
    feature: CategoricalFeature | MultiCategoricalFeature
    values: pl.Series
    split: np.ndarray


def vocabulary_key(path: str, feature: CategoricalFeature | MultiCategoricalFeature) -> str:
    """Features sharing a table share a vocabulary (key: the share name); others have their own (key: the path)."""
    return feature.share if feature.share is not None else path


def train_vocabulary_features(schema: DataSchema) -> list[tuple[str, str, CategoricalFeature | MultiCategoricalFeature]]:
    """(key, path, feature) of every feature whose vocabulary prepare builds."""
    return [(vocabulary_key(p, f), p, f) for p, _, f in schema.id_features() if f.train_vocabulary]


def _flat(source: VocabularySource) -> pl.DataFrame:
    """Values (one row per value; a list's first ``max_len`` elements) with their row's split."""
    frame = pl.DataFrame({"v": source.values, "split": pl.Series(source.split, dtype=pl.Int8)})
    if isinstance(source.feature, MultiCategoricalFeature):
        frame = frame.with_columns(pl.col("v").list.head(source.feature.max_len)).explode("v")
    if isinstance(frame["v"].dtype, (pl.Categorical, pl.Enum)):
        frame = frame.with_columns(pl.col("v").cast(pl.String))
    return frame.drop_nulls("v")


def build_vocabulary(key: str, sources: list[VocabularySource]) -> tuple[list[str | int], VocabularyInfo]:
    """The vocabulary of one key from its sources (see the module docstring) and its report."""
    feature = sources[0].feature
    frames = [_flat(s) for s in sources]
    integer = all(f["v"].dtype.is_integer() for f in frames)
    values = pl.concat([f.with_columns(pl.col("v").cast(pl.Int64 if integer else pl.String)) for f in frames])
    train = values.filter(pl.col("split") == 0)["v"]
    counts = train.value_counts(name="n").sort(["n", "v"], descending=[True, False])
    min_count = feature.vocabulary_min_count or 1
    kept = counts.filter(pl.col("n") >= min_count)
    if feature.vocabulary_max_size is not None:
        kept = kept.head(feature.vocabulary_max_size)
    paths = [s.path for s in sources]
    if len(kept) == 0:
        raise DataError(
            f"{', '.join(paths)}: 'vocabulary: train' found no value in the train split"
            + (f" seen at least {min_count} times (vocabulary_min_count)" if len(counts) else "")
            + "; move the split boundaries, lower vocabulary_min_count or use hash_buckets"
        )
    vocab = kept["v"].to_list()
    known = values["v"].is_in(kept["v"].implode())
    split = values["split"].to_numpy()
    known_np = known.to_numpy()
    splits = {name: SplitOOV(values=int((split == k).sum()), oov=int(((split == k) & ~known_np).sum()))
              for k, name in enumerate(SPLIT_NAMES)}
    info = VocabularyInfo(features=list(dict.fromkeys(paths)), size=len(vocab), min_count=min_count,
                          max_size=feature.vocabulary_max_size, train_distinct=len(counts), splits=splits)
    return vocab, info


def apply_vocabularies(schema: DataSchema, vocabularies: dict[str, list[str | int]]) -> DataSchema:
    """``schema`` with each ``vocabulary: train`` whose key was built replaced by the built list
    (others, e.g. of scenarios not prepared, stay ``train``)."""
    if not vocabularies:
        return schema
    raw = schema.model_dump(mode="json")
    containers = [(f"{kind}[{s['name']}].features", s["features"]) for kind in ("history", "realtime") for s in raw[kind]]
    containers += [(f"scenarios[{s['name']}].{g}", s[g]) for s in raw["scenarios"]
                   for g in ("user_features", "cross_features", "item_features")]
    for where, features in containers:
        for f in features:
            if f.get("vocabulary") != "train":
                continue
            key = f.get("share") or f"{where}[{f['name']}]"
            if key in vocabularies:
                f["vocabulary"] = list(vocabularies[key])
                f.pop("vocabulary_min_count", None)
                f.pop("vocabulary_max_size", None)
    return schema_from_dict(raw, "schema with the vocabularies built on the train split")


def format_vocabularies(vocabularies: dict[str, VocabularyInfo]) -> str:
    """Lines for prepare's output: per vocabulary its size and each split's OOV share."""
    lines = []
    for key, info in vocabularies.items():
        pruned = []
        if info.min_count > 1:
            pruned.append(f"min_count {info.min_count}")
        if info.max_size is not None:
            pruned.append(f"max_size {info.max_size:,}")
        oov = ", ".join(f"{name} {s.share:.1%} of {s.values:,}" for name, s in info.splits.items())
        lines.append(f"vocabulary {key!r} (from train): {info.size:,} values of {info.train_distinct:,} distinct"
                     + (f" ({', '.join(pruned)})" if pruned else "") + f"; out of vocabulary: {oov}")
    return "\n".join(lines)
