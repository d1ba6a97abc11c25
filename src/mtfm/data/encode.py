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

from mtfm.config import (
    CategoricalFeature,
    Feature,
    MultiCategoricalFeature,
    NumericFeature,
)
from mtfm.data.validate import DataError

HASH_SEEDS: tuple[int, int, int, int] = (0x4D54464D, 0x6D74666D, 0x2F2F2F2F, 0x1234ABCD)

# Encoded dtypes, shared with the store and the loader. Ids are stored as int32 whenever the
# feature's cardinality allows (measured 1.4x faster Parquet writes than int64, half the
# bytes); the loader widens them to the int64 the model takes.
FLOAT_TYPE = pa.float32()
_INT32_MAX = 2**31 - 1


def id_type(feature: CategoricalFeature | MultiCategoricalFeature) -> pa.DataType:
    return pa.int32() if feature.cardinality <= _INT32_MAX else pa.int64()


def _polars_id_type(feature: CategoricalFeature | MultiCategoricalFeature) -> pl.DataType:
    return pl.Int32 if feature.cardinality <= _INT32_MAX else pl.Int64


def range_positions(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [k + 1] from 0, positions) of the concatenated ranges [start_i, end_i)."""
    lengths = end - start
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)


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


def base_stats(feature: Feature, raw_dtype: pl.DataType) -> FeatureStats:
    """The statistics that need no data: encoding, cardinality, seeds, normalisation kind."""
    stats = FeatureStats(kind=feature.kind, encoding=_encoding_name(feature), raw_dtype=str(raw_dtype))
    if isinstance(feature, NumericFeature):
        stats.normalization = feature.normalization
        stats.clip = list(feature.clip) if feature.clip is not None else None
        return stats
    stats.cardinality = feature.cardinality
    if feature.hash_buckets is not None:
        stats.hash_seeds = list(HASH_SEEDS)
    return stats


def _clipped(expr: pl.Expr, feature: NumericFeature) -> pl.Expr:
    x = expr.cast(pl.Float64)
    return x.clip(*feature.clip) if feature.clip is not None else x


def fit_frame(frame: pl.DataFrame, features: list[tuple[Feature, str]], train: np.ndarray | None,
              origin: str) -> dict[str, FeatureStats]:
    """Statistics of every (feature, key); ``standard`` / ``minmax`` fitted on the ``train`` rows
    (bool mask; None = all rows), all in one aggregate pass so polars runs them in parallel."""
    stats = {key: base_stats(f, frame[f.name].dtype) for f, key in features}
    fitted = [(f, key) for f, key in features
              if isinstance(f, NumericFeature) and f.normalization in ("standard", "minmax")]
    if not fitted:
        return stats
    sub = frame.select(list(dict.fromkeys(f.name for f, _ in fitted)))
    if train is not None:
        sub = sub.filter(pl.Series(train))
    aggs = []
    for f, key in fitted:
        x = _clipped(pl.col(f.name), f)  # type: ignore[arg-type]
        aggs += [x.mean().alias(f"{key}|mean"), x.std(ddof=0).alias(f"{key}|std"), x.min().alias(f"{key}|min"),
                 x.max().alias(f"{key}|max")]
    row = sub.select(aggs).row(0, named=True) if len(sub) else {}
    for f, key in fitted:
        if len(sub) == 0:
            raise DataError(
                f"{origin}: column '{f.name}': no train-split rows to fit '{f.normalization}' "  # type: ignore[union-attr]
                "normalisation on; move the split boundaries or use normalization none/log1p"
            )
        st = stats[key]
        st.fit_rows, st.mean, st.std = len(sub), float(row[f"{key}|mean"]), float(row[f"{key}|std"])
        st.min, st.max = float(row[f"{key}|min"]), float(row[f"{key}|max"])
        if f.normalization == "standard":  # type: ignore[union-attr]
            st.center, st.scale = st.mean, (st.std if st.std > 0 else 1.0)
        else:
            st.center, st.scale = st.min, (st.max - st.min if st.max > st.min else 1.0)
    return stats


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def _id_expr(expr: pl.Expr, dtype: pl.DataType, feature: CategoricalFeature | MultiCategoricalFeature) -> pl.Expr:
    """Raw values (of ``dtype``) -> ids of the feature's id type."""
    out = _polars_id_type(feature)
    if feature.num_embeddings is not None:
        return expr.cast(out)
    if feature.vocabulary is not None:
        vocab, ids = feature.vocabulary, list(range(1, len(feature.vocabulary) + 1))
        if dtype.is_integer() and all(isinstance(v, int) and not isinstance(v, bool) for v in vocab):
            return expr.cast(pl.Int64).replace_strict(vocab, ids, default=0, return_dtype=out)
        return expr.cast(pl.String).replace_strict([str(v) for v in vocab], ids, default=0, return_dtype=out)
    assert feature.hash_buckets is not None
    canonical = expr.cast(pl.Int64) if dtype.is_integer() else expr.cast(pl.String)
    return (canonical.hash(*HASH_SEEDS) % feature.hash_buckets).cast(out)


def _numeric_expr(expr: pl.Expr, feature: NumericFeature, stats: FeatureStats) -> pl.Expr:
    x = _clipped(expr, feature)
    if feature.normalization == "log1p":
        x = x.log1p()
    if stats.center != 0.0 or stats.scale != 1.0:
        x = (x - stats.center) / stats.scale
    return x.cast(pl.Float32)


def encode_ids(values: pl.Series, feature: CategoricalFeature | MultiCategoricalFeature) -> tuple[pl.Series, int]:
    """Scalar values -> ids; returns (ids, number of out-of-vocabulary values)."""
    ids = values.to_frame("v").select(_id_expr(pl.col("v"), values.dtype, feature)).to_series()
    return ids, int((ids == 0).sum()) if feature.vocabulary is not None else 0


def _count(mask: np.ndarray, counted: np.ndarray | None) -> int:
    """Rows where ``mask`` holds, among the ``counted`` rows (all rows when None)."""
    return int(mask.sum() if counted is None else (mask & counted).sum())


def _encode_multi(values: pl.Series, feature: MultiCategoricalFeature,
                  counted: np.ndarray | None) -> tuple[pa.Array, int, int]:
    """Keep the first max_len values of each list (cut by offsets, not per-row list ops) and
    encode the flat values once."""
    arr = values.to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    offsets = np.asarray(arr.offsets).astype(np.int64, copy=False)
    lengths = np.diff(offsets)
    excess = np.maximum(lengths - feature.max_len, 0)
    truncated = int(excess.sum() if counted is None else excess[counted].sum())
    if excess.any():
        new_offsets, pos = range_positions(offsets[:-1], offsets[:-1] + np.minimum(lengths, feature.max_len))
        flat = arr.values.take(pa.array(pos))
    else:
        new_offsets, flat = offsets - offsets[0], arr.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    ids, _ = encode_ids(pl.Series(flat), feature)
    oov = 0
    if feature.vocabulary is not None:
        zero = (ids == 0).to_numpy()
        oov = _count(zero, None if counted is None else np.repeat(counted, np.diff(new_offsets)))
    return pa.LargeListArray.from_arrays(pa.array(new_offsets), ids.to_arrow()), oov, truncated


def encode_frame(frame: pl.DataFrame, features: list[tuple[Feature, str]], stats: dict[str, FeatureStats],
                 counted: np.ndarray | None = None) -> tuple[dict[str, np.ndarray | pa.Array], dict[str, FeatureStats]]:
    """Encode every (feature, key) of ``frame`` (all rows, in the frame's order).

    Scalar features go through one polars ``select`` (evaluated in parallel); returns numpy
    arrays for them (int32/int64 ids, float32 values) and large_list arrays of ids for
    multi-categorical features, plus ``stats`` with the counts this call adds: OOV values,
    truncated list values and clipped values among the ``counted`` rows (bool mask; None = all
    rows), so rows dropped by policy do not inflate them.
    """
    out: dict[str, np.ndarray | pa.Array] = {}
    counts = {key: stats[key].model_copy() for _, key in features}
    scalar = [(f, key) for f, key in features if not isinstance(f, MultiCategoricalFeature)]
    exprs = [
        (_numeric_expr(pl.col(f.name), f, stats[key]) if isinstance(f, NumericFeature)
         else _id_expr(pl.col(f.name), frame[f.name].dtype, f)).alias(key)
        for f, key in scalar
    ]
    encoded = frame.select(exprs) if exprs else None
    for f, key in scalar:
        assert encoded is not None
        arr = encoded[key].to_numpy()
        if isinstance(f, CategoricalFeature) and f.vocabulary is not None:
            counts[key].oov_values += _count(arr == 0, counted)
        if isinstance(f, NumericFeature) and f.clip is not None:
            raw = frame[f.name].cast(pl.Float64).to_numpy()
            counts[key].clipped_values += _count((raw < f.clip[0]) | (raw > f.clip[1]), counted)
        out[key] = arr
    for f, key in features:
        if isinstance(f, MultiCategoricalFeature):
            out[key], oov, truncated = _encode_multi(frame[f.name], f, counted)
            counts[key].oov_values += oov
            counts[key].truncated_values += truncated
    return out, counts
