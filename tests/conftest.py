"""Shared pytest setup.

Triton's CPU interpreter must be chosen before anything imports Triton (``torch.utils.flop_counter``
does, in ``test_model_flops``), so on machines without CUDA it is selected here, once, for the
Triton kernel tests (``test_triton_*.py``); nothing else runs Triton kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
