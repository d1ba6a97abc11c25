"""Feature encoding: raw columns -> embedding ids (int64) or normalised floats (float32).

Why here and not in the loader: the loader must only move buffers, so every feature decision
is taken once, at prepare time, and written down in the manifest (``FeatureStats``) so that
inference requests are encoded identically (:func:`mtfm.data.aggregate.build_request`).

Categorical encodings (exactly one per feature, see :class:`mtfm.config.CategoricalFeature`):

* ``num_embeddings``: the value is the id (range checked by :mod:`mtfm.data.validate`);
* ``vocabulary``: id = position + 1, id 0 = out of vocabulary; OOV values are *counted*
  (``oov_values``). Integer columns match integer vocabulary entries; otherwise values are
  compared as text;
* ``hash_buckets``: ``polars.Series.hash`` with the fixed seeds :data:`HASH_SEEDS`, modulo the
  bucket count. Integers are hashed as Int64 and text as String, so the result does not depend
  on the integer width or on Categorical vs String. The hash is stable across runs and
  processes; polars only promises stability within one version, so the manifest records the
  polars version (``read_manifest`` warns when it differs).

Multi-categorical (list) features keep their first ``max_len`` values; the values cut off are
counted (``truncated_values``).

Numeric features: optional clip (clipped values counted), then ``none`` / ``log1p`` /
``standard`` / ``minmax``. ``standard`` and ``minmax`` statistics are fitted on the *train*
split only; a zero standard deviation or range leaves the values centred but unscaled
(scale 1), which the stats record.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from mtfm.config import CategoricalFeature, Feature, MultiCategoricalFeature, NumericFeature
from mtfm.data.validate import DataError

HASH_SEEDS: tuple[int, int, int, int] = (0x4D54464D, 0x6D74666D, 0x2F2F2F2F, 0x1234ABCD)

# Encoded dtypes, shared with the store and the loader.
ID_TYPE = pa.int64()
FLOAT_TYPE = pa.float32()
MULTI_TYPE = pa.large_list(pa.int64())


class FeatureStats(BaseModel):
    """Everything needed to re-encode a feature exactly, plus counts of what encoding changed."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["categorical", "multi_categorical", "numeric"]
    encoding: Literal["ids", "vocabulary", "hash", "numeric"]
    raw_dtype: str
    cardinality: int | None = None  # embedding rows the ids need (categorical)
    hash_seeds: list[int] | None = None
    normalization: str | None = None
    clip: list[float] | None = None
    center: float = 0.0  # encoded = (raw - center) / scale, after clip / log1p
    scale: float = 1.0
    fit_rows: int = 0  # train rows the statistics were computed on
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    oov_values: int = 0
    truncated_values: int = 0
    clipped_values: int = 0


def _encoding_name(feature: Feature) -> Literal["ids", "vocabulary", "hash", "numeric"]:
    if isinstance(feature, NumericFeature):
        return "numeric"
    if feature.num_embeddings is not None:
        return "ids"
    return "vocabulary" if feature.vocabulary is not None else "hash"


def fit_stats(feature: Feature, train_values: pl.Series, origin: str) -> FeatureStats:
    """Stats of one feature; numeric ``standard`` / ``minmax`` are fitted on ``train_values``."""
    base = FeatureStats(kind=feature.kind, encoding=_encoding_name(feature), raw_dtype=str(train_values.dtype))
    if not isinstance(feature, NumericFeature):
        base.cardinality = feature.cardinality
        if feature.hash_buckets is not None:
            base.hash_seeds = list(HASH_SEEDS)
        return base
    base.normalization = feature.normalization
    base.clip = list(feature.clip) if feature.clip is not None else None
    if feature.normalization not in ("standard", "minmax"):
        return base
    x = _clipped(train_values.cast(pl.Float64), feature)
    if len(x) == 0:
        raise DataError(
            f"{origin}: column '{feature.name}': no train-split rows to fit '{feature.normalization}' "
            "normalisation on; move the split boundaries or use normalization none/log1p"
        )
    mean, std = float(x.mean()), float(x.std(ddof=0))  # type: ignore[arg-type]
    lo, hi = float(x.min()), float(x.max())  # type: ignore[arg-type]
    base.fit_rows, base.mean, base.std, base.min, base.max = len(x), mean, std, lo, hi
    if feature.normalization == "standard":
        base.center, base.scale = mean, (std if std > 0 else 1.0)
    else:
        base.center, base.scale = lo, (hi - lo if hi > lo else 1.0)
    return base


def _clipped(x: pl.Series, feature: NumericFeature) -> pl.Series:
    return x.clip(*feature.clip) if feature.clip is not None else x


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def _vocabulary_ids(values: pl.Series, vocabulary: list[str | int]) -> pl.Series:
    ids = list(range(1, len(vocabulary) + 1))
    all_int = all(isinstance(v, int) and not isinstance(v, bool) for v in vocabulary)
    if values.dtype.is_integer() and all_int:
        return values.cast(pl.Int64).replace_strict(vocabulary, ids, default=0, return_dtype=pl.Int64)
    text = values.cast(pl.String)
    return text.replace_strict([str(v) for v in vocabulary], ids, default=0, return_dtype=pl.Int64)


def _hash_ids(values: pl.Series, buckets: int) -> pl.Series:
    canonical = values.cast(pl.Int64) if values.dtype.is_integer() else values.cast(pl.String)
    return (canonical.hash(*HASH_SEEDS) % buckets).cast(pl.Int64)


def encode_ids(values: pl.Series, feature: CategoricalFeature | MultiCategoricalFeature) -> tuple[pl.Series, int]:
    """Scalar values -> int64 ids; returns (ids, number of out-of-vocabulary values)."""
    if feature.num_embeddings is not None:
        return values.cast(pl.Int64), 0
    if feature.vocabulary is not None:
        ids = _vocabulary_ids(values, feature.vocabulary)
        return ids, int((ids == 0).sum())
    assert feature.hash_buckets is not None
    return _hash_ids(values, feature.hash_buckets), 0


def _encode_multi(values: pl.Series, feature: MultiCategoricalFeature) -> tuple[pa.Array, int, int]:
    lengths = values.list.len()
    truncated = int((lengths - feature.max_len).clip(lower_bound=0).sum())
    kept = values.list.head(feature.max_len).to_arrow()
    if isinstance(kept, pa.ChunkedArray):
        kept = kept.combine_chunks()
    kept = kept.cast(pa.large_list(kept.type.value_type))
    flat = pl.Series(kept.flatten())
    ids, oov = encode_ids(flat, feature)
    offsets = kept.offsets
    if kept.offset != 0:  # a sliced array: offsets are absolute into its values; rebase
        offsets = pa.array(np.asarray(offsets) - np.asarray(offsets)[0])
    return pa.LargeListArray.from_arrays(offsets, ids.to_arrow().cast(pa.int64())), oov, truncated


def encode_feature(feature: Feature, values: pl.Series, stats: FeatureStats) -> tuple[pa.Array, FeatureStats]:
    """Encode one column. Returns the array and ``stats`` with this call's counts added.

    Output types: categorical -> int64, numeric -> float32, multi_categorical ->
    large_list<int64> (the store and loader rely on these).
    """
    counts = stats.model_copy()
    if isinstance(feature, NumericFeature):
        x = values.cast(pl.Float64)
        if feature.clip is not None:
            counts.clipped_values += int(((x < feature.clip[0]) | (x > feature.clip[1])).sum())
            x = x.clip(*feature.clip)
        if feature.normalization == "log1p":
            x = x.log1p()
        if stats.center != 0.0 or stats.scale != 1.0:
            x = (x - stats.center) / stats.scale
        return x.cast(pl.Float32).to_arrow(), counts
    if isinstance(feature, MultiCategoricalFeature):
        arr, oov, truncated = _encode_multi(values, feature)
        counts.oov_values += oov
        counts.truncated_values += truncated
        return arr, counts
    ids, oov = encode_ids(values, feature)
    counts.oov_values += oov
    return ids.to_arrow(), counts


def empty_array(feature: Feature) -> pa.Array:
    """A zero-length array of the encoded type (for requests without a table)."""
    if isinstance(feature, NumericFeature):
        return pa.array([], type=FLOAT_TYPE)
    if isinstance(feature, MultiCategoricalFeature):
        return pa.array([], type=MULTI_TYPE)
    return pa.array([], type=ID_TYPE)
