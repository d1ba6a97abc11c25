"""Embedding sharing: which categorical features read which embedding table.

Sharing is declared, never inferred: a categorical or multi-categorical feature with
``share: NAME`` reads the table ``NAME``, together with every other feature declaring the same
name (their encodings must agree, which the schema validates); a feature without ``share`` has a
table of its own, even when another feature has the same name and the same cardinality (two
campaigns' ``item_id`` columns of equal vocabulary size are unrelated items until the schema
says otherwise). :class:`mtfm.model.embedding.FeatureEmbeddings` builds its tables from this
plan; ``mtfm prepare`` and ``mtfm train`` print it (:func:`format_sharing_plan`).

Before issue 11 the model config's ``share_embeddings_by_name`` (on by default) shared one table
between every two features with the same name and encoding. Checkpoints from then carry that
flag; :func:`legacy_shares` writes the sharing it implied into their schema as ``share:``
declarations (named as the old tables were, so their weights load unchanged).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from mtfm.config import CategoricalFeature, DataSchema, MultiCategoricalFeature, schema_from_dict

LEGACY_FLAG = "share_embeddings_by_name"


@dataclass
class TablePlan:
    """One embedding table: its share name (None: the table of one unshared feature) and the
    features reading it as (schema path, model field, feature)."""

    share: str | None
    members: list[tuple[str, str, CategoricalFeature | MultiCategoricalFeature]] = field(default_factory=list)


def sharing_plan(schema: DataSchema) -> list[TablePlan]:
    """The tables of ``schema``'s categorical features, in order of first use (model order)."""
    tables: list[TablePlan] = []
    by_share: dict[str, TablePlan] = {}
    for path, fld, feat in schema.id_features():
        if feat.share is None:
            tables.append(TablePlan(None, [(path, fld, feat)]))
        elif feat.share in by_share:
            by_share[feat.share].members.append((path, fld, feat))
        else:
            by_share[feat.share] = TablePlan(feat.share, [(path, fld, feat)])
            tables.append(by_share[feat.share])
    return tables


def _size(feat: CategoricalFeature | MultiCategoricalFeature) -> str:
    if feat.train_vocabulary:
        return "vocabulary from train"
    if feat.hash_buckets is not None:
        return f"{feat.hash_buckets:,} hash buckets"
    return f"{feat.cardinality:,} rows"


def _where(fld: str) -> str:
    """``H:clicks`` -> ``history clicks``, ``T:HP:item`` -> ``HP item``."""
    kind, _, rest = fld.partition(":")
    if kind == "H":
        return f"history {rest}"
    if kind == "R":
        return f"realtime {rest}"
    return rest.replace(":", " ")


def format_sharing_plan(schema: DataSchema, max_unshared: int = 8) -> str:
    """A readable block: each shared table with the features reading it, then the unshared
    features (counted; the first ``max_unshared`` named)."""
    plan = sharing_plan(schema)
    shared = [t for t in plan if t.share is not None]
    unshared = [t for t in plan if t.share is None]
    reads = sum(len(t.members) for t in shared)
    if shared:
        lines = [f"embedding tables: {len(plan)} ({len(shared)} shared by `share:`, read by {reads} feature{'s' if reads != 1 else ''}; "
                 f"{len(unshared)} unshared features, one table each)"]
    else:
        lines = [f"embedding tables: {len(plan)}, one per categorical feature (no feature declares `share:`)"]
    for t in shared:
        feat = t.members[0][2]
        names = ", ".join(f"{_where(fld)}.{f.name}" for _, fld, f in t.members)
        lines.append(f"  share {t.share!r} ({_size(feat)}): {names}")
    if unshared:
        shown = ", ".join(f"{_where(t.members[0][1])}.{t.members[0][2].name}" for t in unshared[:max_unshared])
        more = f", ... (+{len(unshared) - max_unshared})" if len(unshared) > max_unshared else ""
        lines.append(f"  unshared ({len(unshared)}): {shown}{more}")
    links = content_link_shares(schema)
    if links:
        lines.append(f"  content match (model option content_match) compares: {', '.join(map(repr, links))}")
    else:
        lines.append("  content match (model option content_match): no table is shared by a scenario and a sequence, "
                     "so a model with it on runs without it")
    return "\n".join(lines)


def content_link_shares(schema: DataSchema) -> list[str]:
    """Share names read by a scenario's feature and by a history or real-time feature: what the
    model's content match compares (:mod:`mtfm.model.content`), sorted."""
    return sorted(t.share for t in sharing_plan(schema)
                  if t.share is not None and links_scenario_and_sequence(fld for _, fld, _ in t.members))


def links_scenario_and_sequence(fields: Iterable[str]) -> bool:
    """Whether a table read by these model fields is read by a scenario (``T:...``) and by a history
    or real-time sequence (``H:`` / ``R:``): the one rule of what the content match compares."""
    sides = {"T" if field.startswith("T:") else "C" for field in fields}
    return sides == {"T", "C"}


# --------------------------------------------------------------------------------------------
# Checkpoints from before explicit sharing
# --------------------------------------------------------------------------------------------


def _module_key(name: str) -> str:
    from mtfm.model.embedding import module_key

    return module_key(name)


def legacy_shares(schema: DataSchema, embedding_dim: int) -> DataSchema:
    """``schema`` with the sharing ``share_embeddings_by_name: true`` implied, declared: every
    categorical feature gets ``share:`` = the name of the table the old rule gave it (features
    with the same name and the same encoding and width shared; the table named after the
    feature, ``_`` appended when that name was taken). Members of one old table whose declared
    ``embedding_dim`` differed (unset vs the model default) get the width they had set."""
    raw = schema.model_dump(mode="json")
    old_key: dict[tuple, str] = {}
    taken: set[str] = set()
    assigned: list[tuple[dict, str, int]] = []
    for path, _, feat in schema.id_features():
        dim = feat.embedding_dim or embedding_dim
        vocab = tuple(map(str, feat.vocabulary)) if isinstance(feat.vocabulary, list) else feat.vocabulary
        enc = (feat.name, feat.num_embeddings, vocab, feat.hash_buckets, dim)
        if enc not in old_key:
            key = _module_key(feat.name)
            while key in taken:
                key += "_"
            taken.add(key)
            old_key[enc] = key
        assigned.append((_locate(raw, path), old_key[enc], dim))
    dims: dict[str, set] = {}
    for node, key, _ in assigned:
        dims.setdefault(key, set()).add(node.get("embedding_dim"))
    for node, key, dim in assigned:
        node["share"] = key
        if len(dims[key]) > 1:
            node["embedding_dim"] = dim
    return schema_from_dict(raw, "checkpoint schema (legacy sharing)")


def _locate(raw: dict, path: str) -> dict:
    """The feature dict at a :meth:`DataSchema.id_features` path in a dumped schema."""
    head, _, rest = path.partition("].")
    kind, _, owner = head.partition("[")
    spec = next(s for s in raw[kind] if s["name"] == owner)
    group, _, fname = rest.rstrip("]").partition("[")
    return next(f for f in spec[group] if f["name"] == fname)


def upgrade_legacy_model_config(model_config: dict, schema: DataSchema) -> tuple[dict, DataSchema]:
    """A checkpoint's model config and schema as today's code reads them: the removed
    ``share_embeddings_by_name`` flag is dropped and, when it was on, the sharing it implied is
    declared in the schema (:func:`legacy_shares`). Configs without the flag pass unchanged."""
    if LEGACY_FLAG not in model_config:
        return model_config, schema
    config = {k: v for k, v in model_config.items() if k != LEGACY_FLAG}
    if model_config[LEGACY_FLAG] and not any(f.share for _, _, f in schema.id_features()):
        schema = legacy_shares(schema, int(config.get("embedding_dim", 16)))
    return config, schema


def run_sharing_plan(data_dir: str, scenarios: list[str] | None, drop_inputs: list[str] | tuple[str, ...]) -> str:
    """The plan of the model ``mtfm train`` builds on ``data_dir`` (its prepared schema, with the
    loader's scenario restriction and input ablation), for the start of training."""
    from mtfm.data.store import read_manifest

    schema = read_manifest(data_dir).schema_obj
    if scenarios:
        schema = schema.restrict(list(scenarios))
    return format_sharing_plan(schema.without(drop_inputs))
