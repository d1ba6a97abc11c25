"""Model configuration: presets, validation errors naming file and field, HTA notation."""

from __future__ import annotations

import pytest

from mtfm.model import MTFM, ModelConfig, ModelConfigError, load_model_config, parse_hta
from mtfm.model.config import preset_names
from mtfm.model.testing import tiny_schema


def test_presets_load_and_the_paper_preset_has_the_papers_sizes():
    assert {"small", "paper"} <= set(preset_names())
    paper = load_model_config("paper")
    assert (paper.d_model, paper.blocks, paper.target_layers_per_block, paper.num_heads, paper.num_kv_groups) == (768, 4, 3, 3, 1)
    assert paper.hta == "(3:1)x4"
    small = load_model_config("small")
    model = MTFM(tiny_schema(), small)
    assert len(model.stack.blocks) == small.blocks


def test_default_stack_is_3_to_1_times_4():
    assert ModelConfig().hta == "(3:1)x4"


@pytest.mark.parametrize("spec, expected", [("(0:16)x1", (0, 16, 1)), ("(16:0)x1", (16, 0, 1)), ("(1:1)x8", (1, 1, 8)),
                                            ("(3:1)x4", (3, 1, 4)), ("( 5 : 1 ) X 3", (5, 1, 3))])
def test_parse_hta_reads_the_papers_notation(spec, expected):
    assert parse_hta(spec) == expected


@pytest.mark.parametrize("spec", ["3:1x4", "(0:0)x4", "(3:1)x0", "(a:1)x2"])
def test_parse_hta_rejects_malformed_specs(spec):
    with pytest.raises(ModelConfigError, match="HTA spec"):
        parse_hta(spec)


def test_bad_config_file_names_file_and_field(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("d_model: 64\nnum_heads: 4\nnum_kv_groups: 3\nblocks: 0\nwidth: 5\n")
    with pytest.raises(ModelConfigError) as err:
        load_model_config(path)
    message = str(err.value)
    assert str(path) in message
    assert "blocks" in message and "width" in message  # field errors and unknown keys both named


def test_inconsistent_heads_and_groups_are_rejected(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("num_heads: 4\nnum_kv_groups: 3\n")
    with pytest.raises(ModelConfigError, match="num_kv_groups \\(3\\) must divide num_heads \\(4\\)"):
        load_model_config(path)


def test_missing_config_and_unknown_preset_are_clear_errors(tmp_path):
    with pytest.raises(ModelConfigError, match="not found"):
        load_model_config(tmp_path / "nope.yaml")
    with pytest.raises(ModelConfigError, match="no such preset"):
        load_model_config("nonexistent_preset")
