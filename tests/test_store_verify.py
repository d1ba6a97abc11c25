"""Data is verified, not trusted (issue 11, part 2, item 2): editing shard counts in
manifest.json used to train silently on part of the data; a truncated or damaged shard is now
refused, naming the file and the manifest field."""

from __future__ import annotations

from pathlib import Path

import pytest
from safety_helpers import copy_store, edit_manifest, make_store

from mtfm.data.loader import BatchLoader
from mtfm.data.store import CorruptDataError, read_manifest


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory)


def test_a_manifest_whose_shard_counts_were_edited_is_refused_naming_file_and_field(store, tmp_path):
    data = copy_store(store, tmp_path)
    shard = read_manifest(data).splits["train"].shards[0]

    def shrink(raw):  # an edit consistent inside the manifest: only the shard file disagrees
        cut = shard.samples // 2
        raw["splits"]["train"]["shards"][0]["samples"] -= cut
        raw["splits"]["train"]["samples"] -= cut
        raw["samples"] -= cut

    edit_manifest(data, shrink)
    with pytest.raises(CorruptDataError, match=rf"part-00000.parquet: {shard.samples} rows in the file, "
                                               r".*manifest.json: splits.train.shards\[0\].samples says"):
        BatchLoader(data, "train", 4, shuffle=True, seed=0)

    edit_manifest(data, lambda raw: raw.update(samples=raw["samples"] + 1))  # totals that do not add up
    with pytest.raises(CorruptDataError, match=r"manifest.json: counts disagree .*samples is \d+, the splits sum to"):
        read_manifest(data)


def test_a_truncated_shard_is_refused_before_any_work_naming_file_and_field(store, tmp_path):
    data = copy_store(store, tmp_path)
    seq = read_manifest(data).splits["valid"].shards[1].sequences["H.clicks"]
    path = data / seq.path
    path.write_bytes(path.read_bytes()[: seq.size // 2])
    BatchLoader(data, "train", 4, shuffle=False, seed=0)  # other splits are not this one's business
    with pytest.raises(CorruptDataError, match=rf"part-00001.H.clicks.parquet: {seq.size // 2} bytes on disk, "
                                               r".*splits.valid.shards\[1\].sequences.H.clicks.size says"):
        BatchLoader(data, "valid", 4, shuffle=False, seed=0)


def test_a_damaged_shard_of_the_right_size_is_refused_when_read(store, tmp_path):
    data = copy_store(store, tmp_path)
    shard = read_manifest(data).splits["train"].shards[1]
    path = data / shard.path
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0x10  # one bit, inside the data pages (the footer still parses)
    path.write_bytes(bytes(raw))
    loader = BatchLoader(data, "train", 4, shuffle=False, seed=0)  # size and footer agree
    with pytest.raises(CorruptDataError, match=r"train/part-00001.parquet: checksum crc32:[0-9a-f]{8}, "
                                               r".*splits.train.shards\[1\].checksum says crc32:"):
        list(loader)


def test_a_format_3_store_is_read_unverified_with_a_warning_and_format_4_without_checksums_refused(store, tmp_path):
    data = copy_store(store, tmp_path)
    expected = sum(b.batch_size for b in BatchLoader(data, "train", 4, shuffle=False, seed=0))

    def strip(raw):
        for split in raw["splits"].values():
            for shard in split["shards"]:
                for entry in [shard, *shard["sequences"].values()]:
                    del entry["size"], entry["checksum"]

    edit_manifest(data, strip)
    with pytest.raises(CorruptDataError, match=r"splits.train.shards\[0\]: no size or checksum \(format 4"):
        read_manifest(data)
    edit_manifest(data, lambda raw: raw.update(format_version=3))
    with pytest.warns(UserWarning, match="format_version 3 has no shard checksums"):
        loader = BatchLoader(data, "train", 4, shuffle=False, seed=0)
    assert sum(b.batch_size for b in loader) == expected
