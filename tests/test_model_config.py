"""Model configuration: presets, validation errors naming file and field, HTA notation."""

from __future__ import annotations

import pytest
import torch

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


def test_attention_alpha_defaults_to_one_over_sqrt_head_width_and_can_be_set():
    assert ModelConfig(d_model=64, num_heads=2).alpha == pytest.approx(32 ** -0.5)
    assert ModelConfig(d_model=64, num_heads=2, attention_alpha=1.0).alpha == 1.0


def test_horizons_time_bias_init_gives_head_zero_every_gap_and_the_last_head_the_shortest_horizon():
    from mtfm.model.layers import FullAttentionLayer

    # 1 h = 3600 s lies in log2 bucket 11 (2048 <= 1 + gap < 4096); 32 buckets: horizons 31, 21, 11.
    cfg = ModelConfig(d_model=24, num_heads=3, relative_time_bias=True, time_bias_init="horizons",
                      time_bias_shortest_horizon_s=3600)
    bias = FullAttentionLayer(cfg, ["H:a", "T:s"]).time_bias.detach()
    assert torch.equal(bias[0], torch.zeros(32))  # sees every gap alike
    for head, horizon in ((1, 21), (2, 11)):
        assert torch.count_nonzero(bias[head, : horizon + 1]) == 0  # open up to its horizon
        assert torch.allclose(bias[head, horizon + 1 :], -3.0 * torch.arange(1.0, 32 - horizon))
    zero = FullAttentionLayer(cfg.model_copy(update={"time_bias_init": "zero"}), ["H:a", "T:s"]).time_bias
    assert torch.count_nonzero(zero) == 0
