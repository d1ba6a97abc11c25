"""The README's multi-campaign schema example is valid and prepares a log in the layouts it names.

Why: the example documents timestamps, string ids (a vocabulary built on the train split),
embedding sharing, vector features, side tables and compressed inputs at once; this test keeps it true (it reads the YAML block from README.md,
writes a small log in exactly the files and column forms the comments describe, and prepares it).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from input_helpers import write_compressed, write_parts
from mtfm.config import schema_from_dict
from mtfm.data.aggregate import prepare
from mtfm.data.sources.directory import load_source as load_directory
from mtfm.data.vocab import format_vocabularies
from mtfm.sharing import sharing_plan

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- schema-example"


def _example() -> dict:
    text = README.read_text()
    block = text[text.index(MARKER):].split("```yaml\n", 1)[1].split("```", 1)[0]
    return yaml.safe_load(block)


def _times(rng: np.random.Generator, n: int) -> np.ndarray:
    start = int(dt.datetime(2024, 5, 13, tzinfo=dt.timezone.utc).timestamp())
    return start + rng.integers(0, 18 * 86_400, n)


def _write_log(d: Path, rng: np.random.Generator) -> int:
    """Every table of the example in the layout its comment names; returns the exposure count."""
    skus = [f"SKU-{i:04x}" for i in range(60)]
    coupons = pl.DataFrame({"coupon_id": skus, "discount": rng.uniform(0, 30, 60),
                            "brand": rng.choice(["acme", "zest", "nova"], 60)})
    coupons.write_parquet(d / "coupons.parquet")
    n = 400
    t = _times(rng, n)
    offsets = [dt.timezone(dt.timedelta(hours=h)) for h in (0, 2, -4)]
    iso = [dt.datetime.fromtimestamp(int(x), tz=offsets[i % 3]).isoformat() for i, x in enumerate(t)]
    click = rng.integers(0, 2, n)
    coupon_log = pl.DataFrame({
        "user_id": rng.integers(0, 20, n), "event_time": iso, "city": rng.choice(["paris", "lyon", "rome"], n),
        "affinity": ["|".join(f"{v:.4f}" for v in row) for row in rng.uniform(size=(n, 40))],
        "slot": rng.integers(0, 40, n), "coupon_id": rng.choice(skus, n), "click": click,
        "redeem": pl.Series(np.where(click == 1, rng.integers(0, 2, n), -1)).replace(-1, None),
    })
    coupon_log.write_csv(d / "coupon_log.csv")
    write_compressed(d / "coupon_log.csv", "gzip")
    m = 300
    banner_log = pl.DataFrame({
        "user_id": rng.integers(0, 20, m), "event_time": pl.from_epoch(pl.Series(_times(rng, m)), "s")
        .dt.replace_time_zone("UTC").dt.convert_time_zone("Europe/Paris"),
        "banner_id": rng.integers(0, 10**9, m), "banner_emb": rng.normal(size=(m, 32)).tolist(),
        "click": rng.integers(0, 2, m),
    })
    write_parts(banner_log, d / "banner_log", 3)
    k = 200
    pl.DataFrame({"user_id": rng.integers(0, 20, k), "event_time": _times(rng, k),
                  "template": rng.integers(0, 12, k), "opened": rng.integers(0, 2, k)}).write_csv(d / "push_log.csv")
    write_compressed(d / "push_log.csv", "zstd")
    pl.DataFrame({"user_id": rng.integers(0, 20, 150), "event_time": pl.from_epoch(pl.Series(_times(rng, 150)), "s"),
                  "coupon_id": rng.choice(skus, 150)}).write_parquet(d / "orders.parquet")
    return n + m + k


def test_the_readme_example_prepares_a_multi_campaign_log(tmp_path) -> None:
    schema = schema_from_dict(_example(), "README.md")
    assert [len(s.feature_groups["user"] + s.feature_groups["cross"] + s.feature_groups["item"])
            for s in schema.scenarios] == [5, 33, 1]  # different feature counts per campaign
    exposures = _write_log(tmp_path, np.random.default_rng(0))
    raw = load_directory(str(tmp_path), schema, None, 0)
    m = prepare(raw, tmp_path / "out")
    assert m.input_exposures == m.output_exposures == exposures
    assert all(m.splits[s].samples > 0 for s in ("train", "valid", "test"))
    assert "T.banner.item.banner_emb[31]" in m.encoding and "T.coupon.cross.affinity_at_slot" in m.encoding
    assert m.encoding["T.coupon.user.city"].oov_values > 0  # "rome" is not in the vocabulary: id 0, counted
    # coupon_id: one vocabulary built on the train split for the campaign and the order history
    # (share: coupon), written into the prepared schema; brand: one hashed table for both
    info = m.vocabularies["coupon"]
    assert info.features == ["history[orders].features[coupon_id]", "scenarios[coupon].item_features[coupon_id]"]
    assert 0 < info.size <= 60 and info.min_count == 2
    prepared = {p: f for p, _, f in m.schema_obj.id_features()}
    vocab = prepared["scenarios[coupon].item_features[coupon_id]"].vocabulary
    assert vocab == prepared["history[orders].features[coupon_id]"].vocabulary and len(vocab) == info.size
    assert {t.share: len(t.members) for t in sharing_plan(m.schema_obj) if t.share} == {"coupon": 2, "brand": 2}
    line = format_vocabularies(m.vocabularies)  # the README quotes this run's report
    assert line in " ".join(README.read_text().replace("`", "").split())
