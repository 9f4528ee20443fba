"""The reference on a CUDA device in float16 and bfloat16, against itself in fp32 on that device.

Same checks and bounds as tests/test_reference_dtype.py (every module keeps the type, logits within
25 unit roundoffs of fp32, the first greedy token where the margin allows), plus the two ways a
user puts the model there: llamavid_ref.load(path, device="cuda", dtype=torch.float16) and
model.to("cuda", torch.float16), then model.ask on CPU pixels. Skipped without a CUDA device.
"""
from __future__ import annotations

import pytest
import torch

import llamavid_ref
from llamavid_ref.tiny import tiny_model
from test_reference_dtype import QUESTION, check_against_fp32

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device (torch.cuda.is_available() is False)")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reference_on_cuda_matches_fp32(tmp_path, dtype):
    error = check_against_fp32(tiny_model(tmp_path, seed=2), dtype, "cuda")
    print(f"{dtype} on {torch.cuda.get_device_name()}: logits within {error:.3g} of fp32's max")


def test_load_onto_cuda_in_fp16_and_ask(tmp_path):
    saved = llamavid_ref.save(tiny_model(tmp_path / "m", seed=3), tmp_path / "ckpt")
    model = llamavid_ref.load(saved, device="cuda", dtype=torch.float16)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cuda", torch.float16)}
    video = torch.randn(4, 3, 28, 28)                                     # CPU fp32 pixels
    answer = model.ask(video, QUESTION, max_new_tokens=5)
    moved = llamavid_ref.load(saved).to("cuda", torch.float16)
    assert moved.ask(video, QUESTION, max_new_tokens=5) == answer
    sampled = model.ask(video, QUESTION, max_new_tokens=5, do_sample=True, seed=1)
    assert isinstance(sampled, str)
