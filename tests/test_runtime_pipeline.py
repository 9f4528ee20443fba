"""The pipeline (the C core over ONNX Runtime stages) end to end against the reference on tiny models:
identical greedy tokens (fused and plain decoders), identical seeded sampling, streaming, multi-turn chat,
threads sharing one pipeline, no torch, the chat CLI, and every bad input with a clear error (a graph whose
tensors are not the manifest's included)."""
import json
import shutil

import av
import numpy as np
import pytest
import torch
from PIL import Image

import llamavid_ref
from export.build import build
from runtime.manifest import ManifestError
from llamavid_ref.model import Chat
from llamavid_ref.templates import question_prompt
from llamavid_ref.video import write_video
from runtime.media import VideoError
from runtime import chat as chat_cli
from runtime.backends.ort import openvino_bf16_cpu, openvino_missing
from runtime.pipeline import Pipeline
from test_export_build import quiet, tiny_checkpoint

QUESTIONS = ["what color is the square ?", "how many shapes are there ?", "what moves left ?"]


@pytest.fixture(scope="module", params=["fused", "plain"])
def pair(request, tmp_path_factory):
    """(pipeline, reference) on the same tiny checkpoint, fp32."""
    root = tmp_path_factory.mktemp(request.param)
    ckpt = tiny_checkpoint(root, fused=request.param == "fused", seed=7)
    art = build(ckpt, "fp32", root / "art", "ort", log=quiet)
    pipe = Pipeline.open(art)
    assert pipe.kv_layout == ("shared" if request.param == "fused" else "concat")
    return pipe, llamavid_ref.load(ckpt)


def clips():
    g = torch.Generator().manual_seed(11)
    return [torch.randn(n, 3, 28, 28, generator=g) for n in (1, 3, 8)]


def test_greedy_tokens_identical_to_reference(pair):
    pipe, ref = pair
    for video in clips():
        for q in QUESTIONS:
            ids = ref.tokenizer.encode_prompt(question_prompt(q))
            want = ref.generate(torch.tensor([ids]), [video], [q], max_new_tokens=16)[0].tolist()
            assert pipe.encode_prompt(question_prompt(q)) == ids
            assert list(pipe.generate(ids, pipe.load_media(video), q, max_new_tokens=16)) == want


def test_ready_visual_rows_give_the_same_tokens(pair):
    """Embeddings in: the reference's visual tokens passed as rows instead of pixels."""
    pipe, ref = pair
    video, q = clips()[1], QUESTIONS[0]
    ids = ref.tokenizer.encode_prompt(question_prompt(q))
    rows = ref.visual_tokens([video], [q])[0].detach().numpy()
    want = ref.generate(torch.tensor([ids]), [video], [q], max_new_tokens=12)[0].tolist()
    assert list(pipe.generate(ids, embeds=rows, max_new_tokens=12)) == want


def test_seeded_top_p_sampling_identical_to_reference(pair):
    pipe, ref = pair
    video = clips()[1]
    assert pipe.ask(video, QUESTIONS[2], max_new_tokens=16) == ref.ask(video, QUESTIONS[2], max_new_tokens=16)
    for seed in (0, 5):
        kw = dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_p=0.8, seed=seed)
        assert pipe.ask(video, QUESTIONS[0], **kw) == ref.ask(video, QUESTIONS[0], **kw)
    ids = ref.tokenizer.encode_prompt(question_prompt(QUESTIONS[1]))
    for kw in (dict(temperature=1.3, top_k=7, top_p=0.95, repetition_penalty=1.2, seed=3),
               dict(temperature=0.7, top_p=1.0, repetition_penalty=0.9, seed=11)):
        want = ref.generate(torch.tensor([ids]), [video], [QUESTIONS[1]], max_new_tokens=16, do_sample=True, **kw)
        got = list(pipe.generate(ids, pipe.load_media(video), QUESTIONS[1], max_new_tokens=16, do_sample=True, **kw))
        assert got == want[0].tolist()


def test_stream_pieces_join_to_the_answer(pair):
    pipe, _ = pair
    video = clips()[2]
    pieces = list(pipe.ask_stream(video, QUESTIONS[1], max_new_tokens=12))
    assert "".join(pieces) == pipe.ask(video, QUESTIONS[1], max_new_tokens=12)


def test_multi_turn_chat_matches_reference_chat(pair):
    pipe, ref = pair
    video = clips()[1]
    mine, theirs = pipe.chat(video), Chat(ref, video)
    for q in QUESTIONS[:2]:
        assert mine.ask(q, max_new_tokens=8) == theirs.ask(q, max_new_tokens=8)


def test_video_and_image_files(pair, tmp_path):
    pipe, ref = pair
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (6, 32, 48, 3), dtype=np.uint8)
    write_video(tmp_path / "clip.mp4", frames, fps=2)
    assert pipe.ask(tmp_path / "clip.mp4", QUESTIONS[0], max_new_tokens=8) == \
        ref.ask(str(tmp_path / "clip.mp4"), QUESTIONS[0], max_new_tokens=8)
    # unusual image modes are converted as the reference converts them (grey, RGBA, 16-bit grey)
    images = {"grey.png": Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8), "L"),
              "rgba.png": Image.fromarray(rng.integers(0, 256, (30, 20, 4), dtype=np.uint8), "RGBA"),
              "grey16.png": Image.fromarray(rng.integers(0, 65535, (24, 24), dtype=np.uint16))}
    for name, img in images.items():
        img.save(tmp_path / name)
        assert pipe.ask(tmp_path / name, QUESTIONS[1], max_new_tokens=6) == \
            ref.ask(str(tmp_path / name), QUESTIONS[1], max_new_tokens=6), name


def test_bad_videos_are_clear_errors(pair, tmp_path):
    pipe, _ = pair
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video at all\n" * 50)
    zero = tmp_path / "zero.mkv"
    with av.open(str(zero), "w") as container:
        s = container.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        audio = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*audio.encode(frame), *audio.encode()]:
            container.mux(packet)
    cases = {tmp_path / "missing.mp4": "no such file", tmp_path / "empty.mp4": "empty (0-byte)",
             tmp_path / "corrupt.mp4": "cannot parse", zero: "at least one decodable frame"}
    for path, fragment in cases.items():
        with pytest.raises(VideoError, match="expected") as e:
            pipe.ask(path, "what ?", max_new_tokens=2)
        assert str(path) in str(e.value) and fragment in str(e.value) and "found" in str(e.value)


def test_bad_arrays_are_clear_errors(pair):
    pipe, _ = pair
    with pytest.raises(ValueError, match=r"expected uint8 \[H,W,3\], found float64 \[4, 4\]"):
        pipe.ask(np.zeros((4, 4)), "what ?")
    with pytest.raises(ValueError, match=r"expected \[T,3,28,28\] float32, found \[2, 3, 32, 32\]"):
        pipe.ask(np.zeros((2, 3, 32, 32), np.float32), "what ?")


def test_question_that_does_not_fit_the_context(pair):
    pipe, _ = pair
    video = torch.randn(300, 3, 28, 28)                    # 600 visual tokens > 512 positions
    with pytest.raises(ValueError, match=r"prompt too long: \d+ tokens .* context of 512 positions"):
        pipe.ask(video, "what ?", max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt too long"):
        pipe.ask(None, "what " * 600, max_new_tokens=4)


def test_open_refuses_a_modified_artifact_dir(pair, tmp_path):
    pipe, _ = pair
    out = tmp_path / "art"
    shutil.copytree(pipe.root, out)
    with open(out / "vision.onnx", "ab") as f:
        f.write(b"x")
    with pytest.raises(ManifestError, match="file vision.onnx was modified: expected sha256"):
        Pipeline.open(out)


def test_open_refuses_a_graph_whose_tensors_are_not_the_manifests(pair, tmp_path):
    pipe, _ = pair
    out = tmp_path / "art"
    shutil.copytree(pipe.root, out)
    m = json.loads((out / "manifest.json").read_text())            # manifest.json itself has no hash
    vision = m["stages"]["vision"]
    vision["inputs"] = {"pixels": vision["inputs"]["pixel_values"]}
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=r"stage vision: vision.onnx: the graph does not match the manifest: inputs "
                                            r"\['pixels'\] in the manifest, not in the graph; inputs \['pixel_values'\] "
                                            r"in the graph, not in the manifest; rebuild the directory"):
        Pipeline.open(out)
    vision["inputs"] = {"pixel_values": vision["inputs"]["pixels"]}
    m["stages"]["head"]["inputs"]["qformer_ids"]["dtype"] = "int32"
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="stage head: head.onnx: .*: qformer_ids: manifest dtype int32, graph int64"):
        Pipeline.open(out)


def test_chat_cli_answers_and_reports_errors(pair, tmp_path, capsys):
    pipe, ref = pair
    img = Image.fromarray(np.full((28, 28, 3), 200, np.uint8))
    img.save(tmp_path / "i.png")
    assert chat_cli.main(["--artifacts", str(pipe.root), "--image", str(tmp_path / "i.png"),
                          "--max-new-tokens", "6", QUESTIONS[0]]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == ref.ask(str(tmp_path / "i.png"), QUESTIONS[0], max_new_tokens=6)
    assert "ort-cpu" in out.err
    assert chat_cli.main(["--artifacts", str(pipe.root), "--video", str(tmp_path / "none.mp4"), "q"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_chat_cli_interactive_turns(pair, tmp_path, capsys, monkeypatch):
    pipe, ref = pair
    video = tmp_path / "v.mp4"
    write_video(video, np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), fps=1)
    turns = iter(QUESTIONS[:2] + [""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(turns))
    assert chat_cli.main(["--artifacts", str(pipe.root), "--video", str(video), "--max-new-tokens", "5"]) == 0
    theirs = Chat(ref, str(video))
    assert capsys.readouterr().out.splitlines() == [theirs.ask(q, max_new_tokens=5) for q in QUESTIONS[:2]]


def stage_tokens(p, video, q) -> np.ndarray:
    """The frames' tokens [T,n+1,H] from a pipeline's own vision and head stages."""
    ids, mask = p.qformer_tokenizer([q])
    feats = p.stages["vision"].infer({"pixel_values": p.load_media(video)})["vision_feats"]
    return p.stages["head"].infer({"vision_feats": feats, "qformer_ids": ids, "qformer_mask": mask})["frame_tokens"]


def logits_of(p, ids, appended) -> list[np.ndarray]:
    """The logits after a text prompt, then after each appended token (one llm call each), in a core session."""
    with p.session(len(ids) + len(appended)) as s:
        out = []
        for chunk in [ids] + [[t] for t in appended]:
            s.prompt(np.asarray(chunk, np.int32))
            out.append(np.frombuffer(s.logits(), np.float32).copy())
        return out


def test_fp16_graphs_run_on_the_cpu_provider_when_asked(tmp_path):
    """precision="fp16" opens the ort-cuda fp16 graphs on ORT's CPU provider (fp16 accuracy without a
    GPU); their visual tokens stay within the fp16 bound of the fp32 pipeline's."""
    art = build(tiny_checkpoint(tmp_path, fused=True, seed=7), "fp16", tmp_path / "art", "ort", log=quiet)
    fp32, fp16 = Pipeline.open(art, backend="ort-cpu"), Pipeline.open(art, precision="fp16")
    assert {v["precision"] for v in fp32.chosen.values()} == {"fp32"}
    assert [(v["precision"], v["backend"], v["file"].endswith(".fp16.onnx")) for v in fp16.chosen.values()] \
        == [("fp16", "ort-cpu", True)] * 3
    video = clips()[2]
    a, b = (stage_tokens(p, video, QUESTIONS[0]) for p in (fp32, fp16))
    assert np.abs(a - b).max() / np.abs(a).max() < 3e-3
    with pytest.raises(RuntimeError, match="in int8"):
        Pipeline.open(art, precision="int8")


@pytest.mark.skipif(openvino_bf16_cpu() is None, reason=f"ort-openvino not usable here: {openvino_missing()}")
def test_fp16_build_runs_vision_and_head_at_bf16_on_openvino(tmp_path):
    """On a CPU with native bf16 and the OpenVINO plugin, the fp16 build's vision, head and LLM prefill run on
    ort-openvino at bf16, LLM decoding on ort-cpu at fp32 in the prefill's KV cache; visual tokens and logits
    stay within the bf16 bound of the fp32 pipeline's, greedy answers are the same."""
    for fused in (True, False):
        root = tmp_path / str(fused)
        art = build(tiny_checkpoint(root, fused=fused, seed=7), "fp16", root / "art", "ort", log=quiet)
        fp32, cpu16 = Pipeline.open(art, backend="ort-cpu"), Pipeline.open(art)
        prefill = "llm/prefill.onnx" if fused else "llm/decoder.onnx"
        assert [(s, v["file"], v["precision"], v["backend"]) for s, v in cpu16.chosen.items()] == [
            ("vision", "vision.onnx", "bf16", "ort-openvino"), ("head", "head.onnx", "bf16", "ort-openvino"),
            ("llm", "llm/decoder.onnx", "fp32", "ort-cpu"), ("llm_prefill", prefill, "bf16", "ort-openvino")]
        assert "llm_prefill" not in fp32.chosen
        video = clips()[2]
        a, b = (stage_tokens(p, video, QUESTIONS[0]) for p in (fp32, cpu16))
        assert 1e-5 < np.abs(a - b).max() / np.abs(a).max() < 3e-2
        ids = fp32.encode_prompt(fp32.prompt_text([(0, QUESTIONS[1]), (1, None)]))
        logits = [logits_of(p, ids, (5, 9, 3)) for p in (fp32, cpu16)]     # prefill, then decode in its cache
        for x, y in zip(*logits):
            assert 1e-6 < np.abs(x - y).max() / np.abs(x).max() < 3e-2
        assert cpu16.ask(video, QUESTIONS[1], max_new_tokens=8) == fp32.ask(video, QUESTIONS[1], max_new_tokens=8)


def test_openvino_backend_names_what_is_missing(monkeypatch):
    from runtime.backends import ort as ort_backend
    monkeypatch.setattr(ort_backend, "_openvino_cpu", lambda: (None, "a CPU whose capabilities are 'FP32'"))
    with pytest.raises(RuntimeError, match="ort-openvino: expected the onnxruntime-ep-openvino plugin and a CPU "
                                           "with native bf16 .*, found a CPU whose capabilities are 'FP32'"):
        ort_backend.OrtBackend("ort-openvino")
