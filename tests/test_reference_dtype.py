"""The whole reference in a 16-bit type: every module's output keeps the type end to end (vision,
Q-Former, head, LLM, KV cache), fp32 pixels and CPU ids are moved to the model, and the logits
stay close to the same model in fp32. Here on the CPU in bfloat16; tests/test_gpu_reference.py
runs the same checks on CUDA in float16 and bfloat16.

Bound: max |logits - logits_fp32| / max |logits_fp32| <= 25 u, u the type's unit roundoff
(bfloat16 2^-8: 0.098; float16 2^-11: 0.012): the roundings of every layer of the tiny model
compound. Observed on the CPU over 8 random tiny models: bfloat16 0.019-0.070 (5-18 u), float16
0.0028-0.0056 (6-12 u). The first greedy token is compared too, where the fp32 logits leave a
margin between the top two tokens.
"""
from __future__ import annotations

import copy

import pytest
import torch

from llamavid_ref.templates import question_prompt
from llamavid_ref.tiny import tiny_model

BOUNDS = {torch.bfloat16: 25 * 2.0**-8, torch.float16: 25 * 2.0**-11}
QUESTION = "what color is the square ?"


def floating_tensors(value):
    """Every floating-point tensor inside a module's output (tensors, tuples, lists)."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in floating_tensors(v)]
    return []


def run_reference(model, video: torch.Tensor):
    """(logits [1,T,V], greedy tokens, {module name: output dtypes}) of one question about a video
    (fp32 pixels on the CPU, as load_media gives them)."""
    seen: dict[str, set] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: seen.setdefault(name, set()).update(
        t.dtype for t in floating_tensors(out))) for name, m in model.named_modules() if name]
    ids = torch.tensor([model.tokenizer.encode_prompt(question_prompt(QUESTION))])
    try:
        with torch.no_grad():
            logits = model(ids, [video], [QUESTION])
            tokens = model.generate(ids, [video], [QUESTION], max_new_tokens=6)[0].tolist()
    finally:
        for h in hooks:
            h.remove()
    return logits, tokens, seen


def check_against_fp32(model32, dtype, device) -> float:
    """Runs model32 in fp32 and a copy in `dtype`, both on `device`; asserts the type is kept and
    the bound of the module doc holds; returns the relative logit error."""
    video = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    ref_logits, ref_tokens, _ = run_reference(model32.to(device), video)
    model = copy.deepcopy(model32).to(device=device, dtype=dtype)
    logits, tokens, seen = run_reference(model, video)
    assert logits.dtype == dtype and logits.device.type == torch.device(device).type
    wrong = {name: dtypes for name, dtypes in seen.items() if dtypes != {dtype}}
    assert not wrong, f"modules whose outputs left {dtype}: {wrong}"
    error = float((logits.float() - ref_logits).abs().max() / ref_logits.abs().max())
    assert error <= BOUNDS[dtype], f"{dtype} logits differ from fp32 by {error:.3g} of their max"
    top2 = ref_logits[0, -1].float().topk(2).values
    if float(top2[0] - top2[1]) > 4 * BOUNDS[dtype] * float(ref_logits.abs().max()):
        assert tokens[0] == ref_tokens[0]
    return error


def test_reference_runs_in_bf16_on_the_cpu(tmp_path):
    check_against_fp32(tiny_model(tmp_path, seed=2), torch.bfloat16, "cpu")


def test_rope_follows_the_ids_device_and_the_activation_type():
    from llamavid_ref.config import from_name
    from llamavid_ref.llm import rope_cos_sin
    cfg = from_name("tiny").llm
    ids = torch.arange(7)[None]
    cos32, sin32 = rope_cos_sin(cfg, ids)
    cos16, sin16 = rope_cos_sin(cfg, ids, torch.bfloat16)
    assert cos32.dtype == torch.float32 and cos16.dtype == torch.bfloat16 and sin16.dtype == torch.bfloat16
    assert torch.equal(cos16, cos32.to(torch.bfloat16)) and torch.equal(sin16, sin32.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_takes_a_dtype_and_device(tmp_path, dtype):
    """llamavid_ref.load(path, dtype=..., device=...) gives the model in that type on that device."""
    import llamavid_ref
    saved = llamavid_ref.save(tiny_model(tmp_path / "m", seed=1), tmp_path / "ckpt")
    model = llamavid_ref.load(saved, dtype=dtype, device="cpu")
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
