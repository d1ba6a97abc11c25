"""The RankMixer baseline: its token mixing (the shared baseline contract:
test_baseline_contract.py)."""

from __future__ import annotations

import torch
from baseline_contract import one_thread_fixture

from mtfm.baselines.rankmixer import RankMixerBlock, RankMixerConfig, token_mixing

_one_thread = one_thread_fixture()


def test_token_mixing_on_a_hand_example():
    # two tokens of width 4, two heads of width 2: output token h = head h of token 0 || head h of token 1
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0],
                       [5.0, 6.0, 7.0, 8.0]]])
    expected = torch.tensor([[[1.0, 2.0, 5.0, 6.0],
                              [3.0, 4.0, 7.0, 8.0]]])
    assert torch.equal(token_mixing(x, 2), expected)


def test_token_mixing_is_a_parameter_free_permutation_matching_its_definition():
    n, t, d = 3, 4, 8
    x = torch.randn(n, t, d)
    out = token_mixing(x, t)
    assert out.shape == (n, t, d)
    w = d // t
    for h in range(t):
        assert torch.equal(out[:, h], torch.cat([x[:, j, h * w:(h + 1) * w] for j in range(t)], dim=1))
    assert torch.equal(torch.sort(out.flatten(1)).values, torch.sort(x.flatten(1)).values)
    # a block's only parameters are its per-token FFN and its two LayerNorms: mixing adds none
    block = RankMixerBlock(RankMixerConfig(num_tokens=t, d_model=d))
    assert {name.split(".")[0] for name, _ in block.named_parameters()} == {"norm_mix", "ffn", "norm_ffn"}


def test_each_token_position_has_its_own_ffn():
    block = RankMixerBlock(RankMixerConfig(num_tokens=2, d_model=4, ffn_mult=1))
    x = torch.randn(1, 2, 4)
    y = block.ffn(x)
    with torch.no_grad():
        block.ffn.up.weight[1].zero_()  # token 1's FFN only
    z = block.ffn(x)
    assert torch.equal(y[:, 0], z[:, 0])
    assert not torch.equal(y[:, 1], z[:, 1])
