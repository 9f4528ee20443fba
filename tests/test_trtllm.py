"""The LLM on TensorRT-LLM, checked on CPU (export/trtllm.py, runtime/backends/trtllm.py):
- a numpy LLaMA running the converted legacy checkpoint as the engine runs it (each rank on its shard, visual
  tokens as fake ids >= vocab_size looked up in a prompt table) reproduces the reference's logits: fp32 within
  1e-5 for the default model, a tiny model with grouped-query attention, linear RoPE 16, tp 1/2/4; fp16, bf16 and
  weight-only int8/int4 within the bounds stated here;
- transformers' LlamaForCausalLM on the HF export reproduces them from inputs_embeds (fp32, 1e-5);
- the plan checks pass for the default model and the released 7B, 13B, 336 px and long-video shapes;
- bad input is refused before anything is written; python -m export.build --target tensorrt writes the
  checkpoints and the plan where TensorRT-LLM is missing;
- the engine build and the runtime backend's generate loop run through stand-ins for trtllm-build and
  TensorRT-LLM's runner (greedy tokens equal the reference's); the GPU test skips with its reason."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import llamavid_ref
from export import build as build_mod
from export import trtllm
from llamavid_ref.config import from_name
from llamavid_ref.templates import question_prompt
from llamavid_ref.tiny import tiny_model
from runtime.backends.trtllm import TrtllmLLM, place_visual_tokens, sampling_kwargs, trtllm_variant
from runtime.manifest import read_manifest
from test_export_build import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
QUESTION = "what color is the square ?"
# Bounds of the non-fp32 conversions on the default model, over the 50 positions of a 3-frame video prompt:
# max |logit - reference| / max |reference logit|, and the share of positions whose argmax is the reference's.
# Measured: fp16 1.8e-4, bf16 6.4e-3, fp16 + int8_wo 7.0e-3, bf16 + int8_wo 6.7e-3, all argmaxes equal;
# fp16 + int4_wo 0.26 with 49 of 50 argmaxes equal (per-channel int4 without groups is coarse on a model this small).
BOUNDS = [("float16", "none", 1e-3, 1.0), ("bfloat16", "none", 2e-2, 1.0), ("float16", "int8_wo", 2e-2, 1.0),
          ("bfloat16", "int8_wo", 2e-2, 1.0), ("float16", "int4_wo", 0.4, 0.95)]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def default_model():
    return llamavid_ref.load(None)


def tiny(tmp, **llm) -> llamavid_ref.LlamaVid:
    """The tiny preset (4 heads, 2 kv heads: grouped-query attention) with LLM fields changed."""
    cfg = from_name("tiny")
    cfg.llm = dataclasses.replace(cfg.llm, **llm)
    return tiny_model(tmp, seed=3, cfg=cfg)


def video_prompt(model, frames: int = 3, seed: int = 0):
    """A question about random frames -> (ids with the -200 placeholder, the reference's inputs_embeds [P,H],
    the visual tokens [F*(n+1),H], the video)."""
    S = model.config.vision.image_size
    video = torch.randn(frames, 3, S, S, generator=torch.Generator().manual_seed(seed))
    ids = model.tokenizer.encode_prompt(question_prompt(QUESTION, model.config.template))
    with torch.no_grad():
        embeds, _ = model.embed(torch.tensor([ids]), [video], [QUESTION])
        visual = model.visual_tokens([video], [QUESTION])[0]
    return ids, embeds[0], visual.numpy(), video


def reference_logits(model, embeds) -> np.ndarray:
    with torch.no_grad():
        return model.llm(embeds[None])[0][0].double().numpy()


def twin_logits(model, out, ids, visual) -> np.ndarray:
    placed, table = place_visual_tokens(ids, visual, model.config.llm.vocab_size)
    return trtllm.NumpyLlama(out / "trtllm").forward(placed, table)


def snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


# ---- the converted checkpoint reproduces the reference -----------------------------------------------------------
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_default_model_fp32_logits_through_the_prompt_table(default_model, tmp_path, tp):
    ids, embeds, visual, _ = video_prompt(default_model)
    rec = trtllm.convert(default_model, tmp_path / "o", "float32", tp, log=quiet)
    assert [c.message for c in trtllm.check_checkpoint(tmp_path / "o/trtllm") if not c.ok] == []
    assert sorted(p.name for p in (tmp_path / "o/trtllm").iterdir()) == ["config.json"] + [
        f"rank{r}.safetensors" for r in range(tp)]
    assert rec["variant"]["plan"]["tp"] == tp
    ours = twin_logits(default_model, tmp_path / "o", ids, visual)
    assert rel_err(ours, reference_logits(default_model, embeds)) < RTOL


@pytest.mark.parametrize("tp, llm", [(1, {}), (2, {}), (4, {}), (2, {"rope_scaling": 16.0})],
                         ids=["gqa-tp1", "gqa-tp2", "gqa-tp4-kv-duplicated", "gqa-tp2-linear-rope-16"])
def test_tiny_gqa_fp32_logits(tmp_path, tp, llm):
    model = tiny(tmp_path / "m", **llm)
    assert (model.config.llm.heads, model.config.llm.kv_heads) == (4, 2)
    ids, embeds, visual, _ = video_prompt(model)
    trtllm.convert(model, tmp_path / "o", "float32", tp, log=quiet)
    cfg = json.loads((tmp_path / "o/trtllm/config.json").read_text())
    assert cfg["rotary_scaling"] == ({"type": "linear", "factor": 16.0} if llm else None)
    assert cfg["mapping"] == {"world_size": tp, "tp_size": tp, "pp_size": 1} and cfg["num_key_value_heads"] == 2
    header = trtllm.safetensors_header(tmp_path / "o/trtllm/rank0.safetensors")
    q, kv, d = 4 // tp, max(2 // tp, 1), model.config.llm.head_dim            # tp 4: each rank one copy of a kv head
    assert header["transformer.layers.0.attention.qkv.weight"]["shape"] == [(q + 2 * kv) * d, 32]
    ours, ref = twin_logits(model, tmp_path / "o", ids, visual), reference_logits(model, embeds)
    assert rel_err(ours, ref) < RTOL
    if llm:                                      # the scaling matters: without it the logits differ
        cfg["rotary_scaling"] = None
        (tmp_path / "o/trtllm/config.json").write_text(json.dumps(cfg))
        assert rel_err(twin_logits(model, tmp_path / "o", ids, visual), ref) > 1e-3


@pytest.mark.parametrize("dtype, quant, bound, agree", BOUNDS)
def test_16_bit_and_weight_only_within_bounds(default_model, tmp_path, dtype, quant, bound, agree):
    ids, embeds, visual, _ = video_prompt(default_model)
    trtllm.convert(default_model, tmp_path / "o", dtype, quant=quant, log=quiet)
    cfg = json.loads((tmp_path / "o/trtllm/config.json").read_text())
    assert cfg["dtype"] == dtype
    assert cfg["quantization"] == {"quant_algo": trtllm.QUANTS[quant], "kv_cache_quant_algo": None}
    header = trtllm.safetensors_header(tmp_path / "o/trtllm/rank0.safetensors")
    assert {t["dtype"] for t in header.values()} == {"F16" if dtype == "float16" else "BF16"}   # trtllm-build quantizes
    ours, ref = twin_logits(default_model, tmp_path / "o", ids, visual), reference_logits(default_model, embeds)
    assert 1e-5 < rel_err(ours, ref) < bound and (ours.argmax(1) == ref.argmax(1)).mean() >= agree


def test_weight_only_quantization_is_trtllm_builds():
    """Per output channel (row of w [out, in]), scale max|w| / 2^(bits-1), C round (half away from zero), clipped."""
    scale = 1.0 / 128
    w = np.array([[1.0, -0.5, 2.5 * scale, -2.5 * scale, 0.0], [0, 0, 0, 0, 0]])
    assert trtllm.weight_only_ints(w, 8).tolist() == [[127, -64, 3, -3, 0], [0, 0, 0, 0, 0]]
    assert trtllm.weight_only_ints(np.array([[0.7, -1.0, 0.0625]]), 4).tolist() == [[6, -8, 1]]   # 0.5 -> 1


# ---- visual tokens: fake ids + prompt table = the reference's embedding assembly ---------------------------------
def test_placement_reproduces_the_reference_embedding_assembly(default_model, tmp_path):
    m, V = default_model, default_model.config.llm.vocab_size
    trtllm.convert(m, tmp_path / "o", "float32", log=quiet)
    twin = trtllm.NumpyLlama(tmp_path / "o/trtllm")
    ids, embeds, visual, _ = video_prompt(m, frames=4)
    placed, table = place_visual_tokens(ids, visual, V)
    k = ids.index(-200)
    assert placed[:k] == ids[:k] and placed[k + len(visual):] == ids[k + 1:]
    assert placed[k:k + len(visual)] == list(range(V, V + 8)) and table.shape == (8, m.config.llm.hidden)
    assert np.array_equal(twin.embed(placed, table), embeds.double().numpy())       # exact: same fp32 rows
    # long-video layout: one placeholder per frame, each followed by its subtitle
    S = m.config.vision.image_size
    frames = torch.randn(3, 3, S, S, generator=torch.Generator().manual_seed(1))
    lids, images, prompts = m.long_video_inputs(frames, QUESTION, ["red", "", "blue"])
    with torch.no_grad():
        lembeds, _ = m.embed(lids, images, prompts)
        blocks = [b.numpy() for b in m.visual_tokens(images, prompts)]
    placed, table = place_visual_tokens(lids[0].tolist(), blocks, V)
    tpf = m.config.tokens_per_frame
    assert [placed.index(V + f * tpf) for f in range(3)] == sorted(placed.index(V + f * tpf) for f in range(3))
    assert np.array_equal(twin.embed(placed, table), lembeds[0].double().numpy())
    with pytest.raises(ValueError, match=r"expected one block of visual tokens per -200 placeholder; found 3 "
                                         r"placeholders and 2 blocks"):
        place_visual_tokens(lids[0].tolist(), blocks[:2], V)
    with pytest.raises(ValueError, match=rf"expected text ids in \[0, {V}\) and -200 placeholders, found \[{V}\]"):
        place_visual_tokens([1, V, -200], visual, V)
    assert place_visual_tokens([1, 5], None, V)[0] == [1, 5]


# ---- the HF export for the PyTorch backend -----------------------------------------------------------------------
@pytest.mark.parametrize("which", ["default", "tiny-gqa-rope16"])
def test_hf_export_matches_the_reference_from_inputs_embeds(default_model, tmp_path, which):
    from transformers import AutoTokenizer, LlamaForCausalLM
    model = default_model if which == "default" else tiny(tmp_path / "m", rope_scaling=16.0)
    ids, embeds, _, _ = video_prompt(model)
    trtllm.convert(model, tmp_path / "o", "float32", log=quiet)
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "o/hf"), attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = hf(inputs_embeds=embeds[None]).logits[0]
    assert rel_err(theirs, reference_logits(model, embeds)) < RTOL
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "o/hf"))
    assert tok(QUESTION, add_special_tokens=False).input_ids == model.tokenizer.encode(QUESTION)
    layout = json.loads((tmp_path / "o" / trtllm.RECORD).read_text())["variant"]["visual_tokens"]
    assert layout["first_fake_id"] == model.config.llm.vocab_size and layout["tokens_per_frame"] == 2


# ---- the plan ---------------------------------------------------------------------------------------------------
RELEASED = ["llama-vid-7b-full-224-video-fps-1", "llama-vid-7b-full-336", "llama-vid-13b-full-224-video-fps-1",
            "llama-vid-13b-full-336", "llama-vid-7b-full-224-long-video", "default"]


@pytest.mark.parametrize("name", RELEASED)
@pytest.mark.parametrize("tp, quant", [(1, "none"), (2, "int8_wo"), (4, "int4_wo")])
def test_plan_checks_pass_for_the_default_and_released_shapes(name, tp, quant):
    cfg = from_name(name)
    plan = trtllm.make_plan(cfg.llm, cfg.tokens_per_frame, "float16", tp, quant)
    checks = trtllm.check_plan(plan, cfg.llm)
    assert [c.message for c in checks if not c.ok] == [] and len(checks) == 5
    cmd = trtllm.build_command(plan)
    assert cmd[cmd.index("--max_prompt_embedding_table_size") + 1] == str(cfg.tokens_per_frame * plan.max_frames)


def test_plan_numbers_for_7b_and_long_video():
    c7 = from_name("llama-vid-7b-full-224-video-fps-1")
    p = trtllm.make_plan(c7.llm, c7.tokens_per_frame, tp=2, max_batch=4)
    assert (p.max_seq_len, p.max_input_len, p.max_frames, p.max_prompt_embedding_table_size) == (
        4096, 3584, 1728, 13824)
    shapes = trtllm.expected_tensors(trtllm.trtllm_config(c7.llm, p), rank=1)
    assert (shapes["transformer.layers.31.attention.qkv.weight"], shapes["transformer.layers.0.attention.dense.weight"],
            shapes["transformer.layers.0.mlp.fc.weight"], shapes["lm_head.weight"]) == (
        [6144, 4096], [4096, 2048], [5504, 4096], [16000, 4096])
    long = from_name("llama-vid-7b-full-224-long-video")
    p = trtllm.make_plan(long.llm, long.tokens_per_frame, max_frames=7200)          # an hour at 1 fps
    assert (p.max_seq_len, p.max_input_len, p.max_prompt_embedding_table_size) == (65536, 65024, 14400)
    assert trtllm.trtllm_config(long.llm, p)["rotary_scaling"] == {"type": "linear", "factor": 16.0}
    assert trtllm.hf_config(long.llm, "float16")["rope_scaling"] == {"type": "linear", "factor": 16.0}
    image = from_name("llama-vid-13b-full-336")
    assert trtllm.make_plan(image.llm, image.tokens_per_frame).max_frames == 5       # 577 tokens per image


def test_plan_check_failures_name_the_limit():
    c = from_name("default")
    plan = trtllm.make_plan(c.llm, c.tokens_per_frame, max_frames=400)               # 800 visual tokens > 768
    msg = {ch.name: ch.message for ch in trtllm.check_plan(plan, c.llm) if not ch.ok}
    assert msg == {"lengths": "400 frames x 2 tokens + 128 text tokens > max_input_len 768"}
    bad = dataclasses.replace(plan, max_frames=10)
    assert "max_prompt_embedding_table_size 800 != max_batch 1 x 2 tokens per frame x 10 frames = 20" in [
        ch.message for ch in trtllm.check_plan(bad, c.llm) if not ch.ok][0]


# ---- bad input: clear errors, nothing written ---------------------------------------------------------------------
def test_shapes_tensor_parallelism_cannot_split_are_refused(tmp_path):
    model = tiny(tmp_path / "m", hidden=36, heads=6, kv_heads=3)
    with pytest.raises(trtllm.ConvertError, match=r"split: heads 6 not divisible by tp 4; kv heads 3: neither a "
                                                  r"multiple nor a divisor of tp 4 .*nothing was written"):
        trtllm.convert(model, tmp_path / "o", "float32", 4)
    with pytest.raises(trtllm.ConvertError, match=r"kv heads 3: neither a multiple nor a divisor of tp 2"):
        trtllm.convert(model, tmp_path / "o", "float32", 2)
    assert not (tmp_path / "o").exists()


def test_unknown_or_impossible_quantization_is_refused(default_model, tmp_path, capsys):
    with pytest.raises(trtllm.ConvertError, match=r"--quant: expected one of none, int8_wo, int4_wo, found 'int3'"):
        trtllm.convert(default_model, tmp_path / "o", quant="int3")
    with pytest.raises(trtllm.ConvertError, match=r"precision: int8_wo \(W8A16\) runs 16-bit activations .*expected "
                                                  r"--dtype float16 or bfloat16, found float32"):
        trtllm.convert(default_model, tmp_path / "o", "float32", quant="int8_wo")
    with pytest.raises(SystemExit) as e:
        trtllm.main(["--out", str(tmp_path / "o"), "--quant", "int3"])
    assert e.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_folder_holding_another_models_conversion_is_refused(default_model, tmp_path):
    out = tmp_path / "o"
    trtllm.convert(default_model, out, "float32", name="llamavid-default", log=quiet)
    before = snapshot(out)
    with pytest.raises(trtllm.ConvertError, match=rf"{out} holds the TensorRT-LLM conversion of another model "
                                                  r"\('llamavid-default', LLM sha256 [0-9a-f]{12}...\), "
                                                  r"expected 'tiny'"):
        trtllm.convert(tiny(tmp_path / "m"), out, "float32", name="tiny")
    assert snapshot(out) == before
    trtllm.convert(default_model, out, "bfloat16", log=quiet)                         # the same model: replaced
    assert {t["dtype"] for t in trtllm.safetensors_header(out / "trtllm/rank0.safetensors").values()} == {"BF16"}
    other = tmp_path / "p"
    (other / "hf").mkdir(parents=True)
    with pytest.raises(trtllm.ConvertError, match=r"expected no trtllm/, hf/, engine/ folders without "
                                                  r"trtllm_export.json .*found \['hf'\]"):
        trtllm.convert(default_model, other)
    assert [p.name for p in other.iterdir()] == ["hf"]


def test_a_damaged_rank_file_fails_the_checkpoint_check(default_model, tmp_path):
    from safetensors.torch import load_file, save_file
    trtllm.convert(default_model, tmp_path / "o", "float32", 2, log=quiet)
    path = tmp_path / "o/trtllm/rank1.safetensors"
    sd = load_file(str(path))
    sd.pop("transformer.layers.3.mlp.gate.weight")
    name = "transformer.layers.0.attention.dense.weight"
    sd[name] = sd[name][:, :16].clone()
    save_file(sd, str(path))
    ok, bad = trtllm.check_checkpoint(tmp_path / "o/trtllm")
    assert ok.ok and not bad.ok
    assert bad.message == ("rank1.safetensors: missing ['transformer.layers.3.mlp.gate.weight']; "
                           "transformer.layers.0.attention.dense.weight: expected [128, 64] F32, found [128, 16] F32")


def test_a_manifest_without_a_trtllm_variant_is_refused(tmp_path):
    manifest = {"stages": {"llm": {"variants": [{"backend": "ort-cpu", "file": "llm/decoder.onnx"}]}}}
    with pytest.raises(ValueError, match=r"manifest stage llm: expected a variant with backend 'trtllm' \(python -m "
                                         r"export.build --target tensorrt writes it\), found backends \['ort-cpu'\]"):
        trtllm_variant(manifest)
    with pytest.raises(ValueError, match="trtllm backend: expected a variant with backend 'trtllm', found 'ort-cpu'"):
        TrtllmLLM.open(tmp_path, manifest["stages"]["llm"]["variants"][0], {"vocab_size": 512})


# ---- the command lines without TensorRT-LLM ----------------------------------------------------------------------
@pytest.fixture
def no_trtllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)          # import tensorrt_llm -> ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_cli_writes_the_checkpoints_the_record_and_says_what_it_could_not_build(tmp_path, capsys, no_trtllm):
    out = tmp_path / "o"
    assert trtllm.main(["--out", str(out), "--dtype", "float32", "--tp", "2"]) == 0
    text = capsys.readouterr().out
    assert "ok   split        per rank: 2 q heads, 2 kv heads, ffn 192" in text and "FAIL" not in text
    assert ("engine: not built here (TensorRT-LLM: expected the Python package tensorrt_llm, found none; get "
            "TensorRT-LLM with its engine flow") in text
    assert f"cd {out} && trtllm-build --checkpoint_dir trtllm --output_dir engine --max_batch_size 1" in text
    rec = json.loads((out / trtllm.RECORD).read_text())
    assert rec["model"]["name"] == "llamavid-default" and rec["variant"]["engine"] is None
    assert sorted(rec["files"]) == ["hf/config.json", "hf/generation_config.json", "hf/model.safetensors",
                                    "hf/tokenizer.json", "hf/tokenizer_config.json", "trtllm/config.json",
                                    "trtllm/rank0.safetensors", "trtllm/rank1.safetensors"]
    assert TrtllmLLM.missing(out, rec["variant"]).startswith("TensorRT-LLM: expected the Python package tensorrt_llm")


def test_build_target_tensorrt_without_trtllm_writes_the_checkpoints_and_the_plan(tmp_path, no_trtllm):
    ckpt = tiny_checkpoint(tmp_path, fused=True)
    lines = []
    out = build_mod.build(ckpt, "int8", tmp_path / "art", "tensorrt", log=lines.append)
    assert any(line.startswith("[build] --target tensorrt: no TensorRT engines here (TensorRT: expected the Python "
                               "package `tensorrt`") for line in lines)
    assert any(line.startswith("[build] llm: TensorRT-LLM engine not built here (TensorRT-LLM: expected the Python "
                               "package tensorrt_llm") and "run `trtllm-build --checkpoint_dir trtllm" in line
               for line in lines)
    m = read_manifest(out)                                           # every file listed and hashed
    v = m["stages"]["llm"]["variants"][0]
    assert (v["backend"], v["precision"], v["quant"], v["engine"], v["build_dir"]) == ("trtllm", "w8a16", "int8_wo",
                                                                                       None, "llm")
    assert v["build_command"][:5] == ["trtllm-build", "--checkpoint_dir", "trtllm", "--output_dir", "engine"]
    assert {"llm/trtllm/rank0.safetensors", "llm/hf/model.safetensors"} <= set(v["extra_files"]) <= set(m["files"])
    assert [x["backend"] for x in m["stages"]["llm"]["variants"][1:]] == ["ort-cpu", "ort-cuda"]
    assert TrtllmLLM.missing(out, v).startswith("TensorRT-LLM: expected the Python package tensorrt_llm")
    lines.clear()
    build_mod.build(ckpt, "int8", out, "tensorrt", log=lines.append)
    assert "[build] trtllm: unchanged, skipped" in lines and read_manifest(out) == m
    from safetensors.torch import load_file                         # int8 builds: the fp16 + W8A16 conversion
    alone = trtllm.convert(llamavid_ref.load(ckpt), tmp_path / "alone", "float16", quant="int8_wo", log=quiet)
    assert alone["variant"]["plan"] == v["plan"]
    ours, theirs = (load_file(str(d / "trtllm/rank0.safetensors")) for d in (out / "llm", tmp_path / "alone"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# ---- stand-ins for trtllm-build, TensorRT-LLM's runner and a GPU --------------------------------------------------
class TwinRunner:
    """ModelRunnerCpp's generate() over the numpy twin of the engine's checkpoint: greedy, streamed like the real
    runner (output_ids [batch, beams, max_seq] with the prompt, sequence_lengths), the end token included."""
    calls = []

    def __init__(self, engine_dir):
        cfg = json.loads((engine_dir / "config.json").read_text())
        self.twin = trtllm.NumpyLlama(engine_dir / cfg["checkpoint_dir"])

    @classmethod
    def from_dir(cls, engine_dir, rank=0):
        cls.calls.append(("from_dir", engine_dir, rank))
        return cls(Path(engine_dir))

    def generate(self, batch_input_ids, prompt_table=None, prompt_tasks=None, max_new_tokens=1, end_id=None,
                 pad_id=None, streaming=False, return_dict=False, output_sequence_lengths=False, **sampling):
        self.calls.append(("generate", None if prompt_table is None else tuple(prompt_table.shape), prompt_tasks,
                           end_id, streaming, return_dict, output_sequence_lengths, sampling))
        seq = batch_input_ids[0].tolist()
        table = None if prompt_table is None else prompt_table[0].numpy()
        for _ in range(max_new_tokens):
            seq.append(int(self.twin.forward(seq, table)[-1].argmax()))
            yield {"output_ids": torch.tensor([[seq + [end_id] * 5]]), "sequence_lengths": torch.tensor([[len(seq)]])}
            if seq[-1] == end_id:
                return


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """A tensorrt_llm module with TwinRunner as ModelRunnerCpp, a CUDA device, and a trtllm-build on PATH that writes
    engine/config.json recording its arguments (FAIL_BUILD=1: exits 1 with an error)."""
    from kernels import cuda_available
    fake, rt = types.ModuleType("tensorrt_llm"), types.ModuleType("tensorrt_llm.runtime")
    fake.__version__, fake.runtime, rt.ModelRunnerCpp = "0.12.0", rt, TwinRunner
    monkeypatch.setitem(sys.modules, "tensorrt_llm", fake)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.runtime", rt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_available, "compute_capability", lambda device=0: 87)
    TwinRunner.calls = []
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "trtllm-build"
    tool.write_text(f"#!{sys.executable}\n" + textwrap.dedent("""
        import json, os, pathlib, sys
        if os.environ.get("FAIL_BUILD"):
            print("[TRT-LLM] [E] out of memory building the engine", file=sys.stderr)
            sys.exit(1)
        a = sys.argv[1:]
        out = pathlib.Path(a[a.index("--output_dir") + 1])
        out.mkdir()
        (out / "rank0.engine").write_bytes(b"ENGINE")
        ckpt = os.path.relpath(a[a.index("--checkpoint_dir") + 1], out)
        (out / "config.json").write_text(json.dumps({"argv": a, "checkpoint_dir": ckpt}))
    """))
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return monkeypatch


def test_engine_build_through_trtllm_build_and_its_failure(default_model, tmp_path, stand_ins):
    assert trtllm.engine_missing() is None
    out = tmp_path / "o"
    rec = trtllm.convert(default_model, out, "float32", engine=True, log=quiet)
    v = rec["variant"]
    assert v["engine"] == "engine" and v["built_with"] == {"tensorrt_llm": "0.12.0", "sm": 87}
    argv = json.loads((out / "engine/config.json").read_text())["argv"]
    assert argv == trtllm.build_command(trtllm.Plan(**v["plan"]), output_dir=".engine.tmp")[1:]
    assert {"engine/config.json", "engine/rank0.engine"} <= set(rec["files"])
    before = snapshot(out)
    stand_ins.setenv("FAIL_BUILD", "1")
    with pytest.raises(trtllm.ConvertError, match=r"trtllm-build failed \(exit 1, no engine written\): \[TRT-LLM\] "
                                                  r"\[E\] out of memory building the engine"):
        trtllm.convert(default_model, out, "float16", engine=True, log=quiet)
    assert not (out / ".trtllm-staging").exists()
    assert [p for p in snapshot(out) if not p[0].startswith(trtllm.RECORD)] == [
        p for p in before if not p[0].startswith(trtllm.RECORD)]                # the last conversion stands


def test_backend_streams_the_reference_greedy_tokens(default_model, tmp_path, stand_ins):
    m = default_model
    rec = trtllm.convert(m, tmp_path / "o", "float32", engine=True, log=quiet)
    v, V, eos = rec["variant"], m.config.llm.vocab_size, m.config.llm.eos_id
    assert TrtllmLLM.missing() is None and TrtllmLLM.missing(tmp_path / "o", v) is None
    llm = TrtllmLLM.open(tmp_path / "o", v, {"vocab_size": V})
    assert TwinRunner.calls[-1] == ("from_dir", str(tmp_path / "o/engine"), 0)
    ids, _, visual, video = video_prompt(m)
    with torch.no_grad():
        want = m.generate(torch.tensor([ids]), [video], [QUESTION], max_new_tokens=12)[0].tolist()
    placed, table = place_visual_tokens(ids, visual, V)
    got = list(llm.generate(placed, table, 12, [eos], {}))
    assert got == want and len(got) >= 2
    call = TwinRunner.calls[-1]
    assert call[1:] == ((1, 6, 128), "0", eos, True, True, True, {"top_k": 1, "top_p": 0.0, "temperature": 1.0})
    assert list(llm.generate(placed, table, 12, [eos, got[1]], {})) == got[:2]           # another stop id
    assert sampling_kwargs({"do_sample": True, "temperature": 0.5, "top_p": 0.7, "seed": 3}) == {
        "top_k": 0, "top_p": 0.7, "temperature": 0.5, "random_seed": 3}
    with pytest.raises(ValueError, match=rf"expected fake ids {V}..{V + 5} for a prompt table of 6 rows, found "
                                         rf"\[{V}, {V + 1}, {V + 2}\]... \(4 distinct\)"):
        next(llm.generate([t for t in placed if t < V + 4], table, 4, [eos], {}))
    llm.max_table_rows = 4
    with pytest.raises(ValueError, match="6 visual tokens do not fit the engine's prompt table of 4 rows per request"):
        next(llm.generate(placed, table, 4, [eos], {}))


def test_build_target_tensorrt_with_trtllm_builds_and_records_the_engine(tmp_path, stand_ins):
    stand_ins.setitem(sys.modules, "tensorrt", None)
    ckpt = tiny_checkpoint(tmp_path, fused=True)
    lines = []
    out = build_mod.build(ckpt, "fp32", tmp_path / "art", "auto", log=lines.append)   # auto: TensorRT-LLM is here
    v = read_manifest(out)["stages"]["llm"]["variants"][0]
    assert (v["backend"], v["engine"]) == ("trtllm", "llm/engine")
    assert v["built_with"] == {"tensorrt_llm": "0.12.0", "sm": 87}
    assert "llm/engine/rank0.engine" in v["extra_files"] and not any("not built here" in x for x in lines[-3:])
    assert TrtllmLLM.missing(out, v) is None


def test_runtime_backend_imports_no_torch():
    code = ("import sys, runtime.backends.trtllm; "
            "print(sorted(m for m in ('torch', 'llamavid_ref', 'export.trtllm') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.stdout.strip() == "[]"


# ---- on a GPU with TensorRT-LLM (skipped elsewhere, with the reason) -----------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(trtllm.engine_missing() is not None, reason=str(trtllm.engine_missing()))
def test_gpu_engine_answers_with_the_reference_greedy_tokens(default_model, tmp_path):
    m = default_model
    rec = trtllm.convert(m, tmp_path / "o", "float16", engine=True)
    llm = TrtllmLLM.open(tmp_path / "o", rec["variant"], {"vocab_size": m.config.llm.vocab_size})
    ids, _, visual, video = video_prompt(m)
    with torch.no_grad():
        want = m.generate(torch.tensor([ids]), [video], [QUESTION], max_new_tokens=16)[0].tolist()
    placed, table = place_visual_tokens(ids, visual, m.config.llm.vocab_size)
    assert list(llm.generate(placed, table, 16, [m.config.llm.eos_id], {})) == want


def test_pipeline_decodes_on_trtllm_where_it_runs(tmp_path, stand_ins):
    """With TensorRT-LLM and a GPU (stand-ins here), Pipeline.open puts the LLM on the engine: the frames' tokens
    come from the core's vision and head (embeddings out) as a prompt table, and greedy answers are the
    reference's."""
    from runtime.pipeline import Pipeline
    stand_ins.setitem(sys.modules, "tensorrt", None)
    ckpt = tiny_checkpoint(tmp_path, fused=True)
    out = build_mod.build(ckpt, "fp32", tmp_path / "art", "auto", log=quiet)
    pipe = Pipeline.open(out)
    assert pipe.trtllm is not None and pipe.chosen["llm"]["backend"] == "trtllm"
    ref = llamavid_ref.load(ckpt)
    video = np.random.default_rng(4).standard_normal((3, 3, 28, 28)).astype(np.float32)
    for q in ("what color is the square ?", "how many shapes are there ?"):
        assert pipe.ask(video, q, max_new_tokens=10) == ref.ask(torch.from_numpy(video), q, max_new_tokens=10)
    assert TwinRunner.calls[-1][1] == (1, 6, 64) and Pipeline.open(out, backend="ort-cpu").trtllm is None
