"""Issue 18: bad artifacts, bad checkpoints, interrupted and concurrent builds, odd inputs. One test (or
parametrised group) per row of the issue's table, named test_rowNN_*, then the targets: pinned manifest
hashes, symbolic links, and a build killed at 20 random moments."""
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

import llamavid_ref
from export import build as build_mod
from export.build import BuildError, build
from llamavid_ref import CheckpointError
from llamavid_ref.config import VisionConfig, from_name
from llamavid_ref.tiny import tiny_model, write_released
from runtime import bench
from runtime import chat as chat_cli
from runtime.manifest import ManifestError, read_manifest, sha256, write_manifest
from runtime.pipeline import Pipeline
from test_export_build import quiet, tiny_checkpoint


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(checkpoint, artifacts): a tiny fused model built fp32 for ORT."""
    root = tmp_path_factory.mktemp("hardening")
    ckpt = tiny_checkpoint(root, fused=True, seed=3)
    return ckpt, build(ckpt, "fp32", root / "art", "ort", log=quiet)


def copy_art(built, tmp_path):
    out = tmp_path / "art"
    shutil.copytree(built[1], out)
    return out


def edit_manifest(out, fn):
    """Rewrite out/manifest.json with fn(manifest) applied, bypassing write_manifest's checks."""
    m = json.loads((out / "manifest.json").read_text())
    fn(m)
    (out / "manifest.json").write_text(json.dumps(m))
    return m


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


# ---- row 1: runtime files outside the directory -----------------------------------------------------
@pytest.mark.parametrize("section, key", [("llm", "embeddings"), ("tokenizers", "llm"), ("tokenizers", "qformer")])
def test_row01_files_the_runtime_reads_must_be_inside_and_hashed(built, tmp_path, section, key):
    out = copy_art(built, tmp_path)
    original = json.loads((out / "manifest.json").read_text())[section][key]
    outside = tmp_path / "outside" / original.split("/")[-1]
    outside.parent.mkdir()
    shutil.copy(out / original, outside)
    if original.endswith(".npy"):
        np.save(outside, np.zeros_like(np.load(out / original)))          # the all-zeros table of the report
    for path in (str(outside), f"../outside/{outside.name}"):
        edit_manifest(out, lambda m: (m[section].__setitem__(key, path), m["files"].__setitem__(path, sha256(outside))))
        with pytest.raises(ManifestError, match=f"{section}.{key}: expected a relative path inside the artifact "
                                                f"directory .not absolute, no '..'., found the string"):
            read_manifest(out)
    inside = f"{original}.copy"                                           # inside, but not listed in 'files'
    shutil.copy(out / original, out / inside)
    edit_manifest(out, lambda m: (m[section].__setitem__(key, inside), m["files"].pop(f"../outside/{outside.name}"),
                                  m["files"].pop(str(outside))))
    with pytest.raises(ManifestError, match=f"{section}.{key}: expected {inside}, which the runtime reads, listed in "
                                            f"'files' with its hash, found no entry"):
        Pipeline.open(out)


def test_row01_a_symlink_out_of_the_directory_is_refused(built, tmp_path):
    out = copy_art(built, tmp_path)
    evil = tmp_path / "evil.npy"
    np.save(evil, np.zeros((96, 64), np.float32))
    (out / "llm/embed_tokens.npy").unlink()
    (out / "llm/embed_tokens.npy").symlink_to(evil)
    edit_manifest(out, lambda m: m["files"].__setitem__("llm/embed_tokens.npy", sha256(evil)))     # hash "matches"
    with pytest.raises(ManifestError, match=f"llm/embed_tokens.npy resolves to {evil}, outside the artifact directory"):
        read_manifest(out, verify_hashes=False)


def test_row01_a_graphs_external_weights_must_be_listed(built, tmp_path):
    out = copy_art(built, tmp_path)
    (out / "vision.onnx.data").write_bytes(b"weights ORT would read next to vision.onnx")
    with pytest.raises(ManifestError, match=r"stages.vision.variants\[0\].file: expected vision.onnx.data .its external "
                                            r"weights. listed in 'files' with its hash, found no entry"):
        read_manifest(out)


# ---- row 2: stage files that are absolute or climb out ------------------------------------------------
@pytest.mark.parametrize("path", ["/etc/passwd", "../../vision.onnx", "llm/../../x.onnx"])
def test_row02_absolute_and_dotdot_stage_files_are_refused_when_read_and_written(built, tmp_path, path):
    out = copy_art(built, tmp_path)
    m = edit_manifest(out, lambda m: (m["stages"]["vision"]["variants"][0].__setitem__("file", path),
                                      m["files"].__setitem__(path, "0" * 64)))
    message = r"stages.vision.variants\[0\].file: expected a relative path inside the artifact directory"
    with pytest.raises(ManifestError, match=message):
        read_manifest(out)
    with pytest.raises(ManifestError, match=message):
        write_manifest(out, m)
    with pytest.raises(ManifestError, match="outside|climbs out|relative path"):
        build_mod.safe_path(out, path)


# ---- row 3: integer and bool weights -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_row03_weights_that_are_not_floating_point_are_refused(built, tmp_path, dtype):
    from safetensors.torch import load_file, save_file
    ckpt = tmp_path / "ckpt"
    shutil.copytree(built[0], ckpt)
    sd = load_file(str(ckpt / "model.safetensors"))
    sd["llm.embed_tokens.weight"] = sd["llm.embed_tokens.weight"].to(dtype)
    save_file(sd, str(ckpt / "model.safetensors"))
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=f"tensor 'llm.embed_tokens.weight': expected floating-point weights "
                                              rf"\(float16, bfloat16, float32 or float64\), found {name}"):
        llamavid_ref.load(ckpt)


# ---- row 4: manifest values of the wrong type or range -------------------------------------------------
@pytest.mark.parametrize("path, value, message", [
    ("special_ids.eos", "2", r"special_ids.eos: expected an integer in \[0, 4194303\], found the string '2'"),
    ("preprocess.std", [0, 0, 0], r"preprocess.std: expected a list of 3 items, each a number in \(0, 1000\], found a "
                                  r"list of 3 item\(s\) \[the number 0, the number 0, the number 0\]"),
    ("preprocess.image_size", 10 ** 6, r"preprocess.image_size: expected an integer in \[1, 4096\], found the number 1000000"),
    ("llm.kv_heads", 10 ** 6, r"llm.kv_heads: expected an integer in \[1, 1024\], found the number 1000000"),
    ("llm.kv_heads", 512, r"llm.kv_heads x llm.head_dim: expected at most llm.hidden \(64\), found 512 x 16"),
    ("llm.vocab_size", 10 ** 12, r"llm.vocab_size: expected an integer in \[1, 4194304\], found the number 1000000000000"),
    ("llm.vocab_size", 2 ** 20, r"stages.llm.outputs.logits.shape: expected \['\*', '\*', 1048576\], found \['batch', 1, 96\]"),
    ("llm.context", "512", r"llm.context: expected an integer in \[1, 4194304\], found the string '512'"),
    ("runtime.frame_chunk", 0, r"runtime.frame_chunk: expected an integer in \[1, 4096\], found the number 0"),
    ("preprocess.video_fps", float("nan"), r"preprocess.video_fps: expected a number in \(0, 1000\], found the number nan"),
])
def test_row04_manifest_values_of_the_wrong_type_or_range(built, tmp_path, capsys, path, value, message):
    out = copy_art(built, tmp_path)
    section, key = path.split(".")
    edit_manifest(out, lambda m: m[section].__setitem__(key, value))
    with pytest.raises(ManifestError, match=message):
        read_manifest(out)
    assert chat_cli.main(["--artifacts", str(out), "--text-only", "what ?"]) == 2
    assert "problem(s): " in one_line_error(capsys)


def test_row04_the_embedding_table_must_have_the_manifests_shape(built, tmp_path):
    out = copy_art(built, tmp_path)
    def smaller_vocab(m):
        m["llm"]["vocab_size"] = 95
        m["stages"]["llm"]["outputs"]["logits"]["shape"][-1] = 95
    edit_manifest(out, smaller_vocab)
    with pytest.raises(ManifestError, match=r"llm/embed_tokens.npy: expected a float32 \[vocab_size, hidden\] = "
                                            r"\[95, 64\] table, found float32 \[96, 64\]"):
        read_manifest(out)


def test_row04_several_problems_are_each_named_on_one_line(built, tmp_path):
    out = copy_art(built, tmp_path)
    edit_manifest(out, lambda m: (m["special_ids"].pop("bos"), m["llm"].__setitem__("layers", True)))
    with pytest.raises(ManifestError) as e:
        read_manifest(out)
    assert "\n" not in str(e.value) and str(e.value).endswith(
        "2 problem(s): special_ids.bos: expected an integer in [0, 4194303], found no such key; llm.layers: expected "
        "an integer in [1, 1024], found true")


# ---- row 5: absurd sizes in config.json ------------------------------------------------------------------
def peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def test_row05_absurd_sizes_are_refused_before_anything_is_allocated(tmp_path):
    src = tiny_model(tmp_path / "src", seed=1)
    root = write_released(src, tmp_path / "rel")
    hf = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**hf, "hidden_size": 10 ** 9, "num_hidden_layers": 10 ** 6}))
    peak_rss_reset()
    before, t0 = peak_rss(), time.perf_counter()
    with pytest.raises(CheckpointError, match=r"2 problem\(s\) in its configuration: llm.hidden: expected an integer "
                                              r"in \[1, 65536\], found 1000000000; llm.layers: expected an integer in "
                                              r"\[1, 1024\], found 1000000"):
        llamavid_ref.load(root, vision_heads=4, qformer_heads=3)
    assert time.perf_counter() - t0 < 5 and peak_rss() - before < 200 << 20


def test_row05_a_model_larger_than_the_memory_left_is_refused_before_allocation(built, monkeypatch):
    from llamavid_ref import checkpoint
    monkeypatch.setattr(checkpoint, "available_memory", lambda: 1000)
    real, devices = checkpoint.LlamaVid, []
    monkeypatch.setattr(checkpoint, "LlamaVid", lambda cfg: devices.append(torch.empty(0).device.type) or real(cfg))
    with pytest.raises(CheckpointError, match=r"expected a model that fits in this machine's available memory \(9.31e-07 "
                                              r"GiB\), found one that needs 0.\d+ GiB in fp32 \([\d,]+ parameters\)"):
        llamavid_ref.load(built[0])
    assert devices == ["meta"]                                              # built on the meta device only


# ---- row 6: a build killed while writing its progress record -------------------------------------------------
def test_row06_a_corrupt_build_record_counts_as_a_stage_not_done(built, tmp_path):
    ckpt, _ = built
    out = copy_art(built, tmp_path)
    (out / ".build/vision.json").write_text('{"key": "5b1')                       # cut short mid-write
    lines = []
    build(ckpt, "fp32", out, "ort", log=lines.append)
    assert [line.split()[2] for line in lines if "exporting" in line] == ["vision:"]
    assert json.loads((out / ".build/vision.json").read_text())["key"] == read_manifest(out)["build"]["key"]
    # the same in the workspace of a build that was killed (.art.build/next), which the next build resumes
    ws = build_mod._workspace(out)
    shutil.copytree(out, ws / "next")
    (ws / "next/.build/head.json").write_text("\0\0\0")
    lines.clear()
    build(ckpt, "fp32", out, "ort", log=lines.append)
    assert sum("unchanged, skipped" in line for line in lines) == 4 and not ws.exists()
    read_manifest(out)


def test_records_are_written_atomically(tmp_path):
    (tmp_path / ".build").mkdir()
    build_mod._record(tmp_path, "vision", {"key": "k", "files": {}})
    assert sorted(p.name for p in (tmp_path / ".build").iterdir()) == ["vision.json"]
    assert build_mod._unchanged(tmp_path, "vision", "k") == {"key": "k", "files": {}}
    for corrupt in ("", "[]", '{"key": "k", "files": {"../../etc/passwd": "x"}}', '{"key": "k"}'):
        (tmp_path / ".build/vision.json").write_text(corrupt)
        assert build_mod._unchanged(tmp_path, "vision", "k") is None


# ---- row 7: two builds into the same --out at once -----------------------------------------------------------
def test_row07_a_second_build_refuses_while_the_first_holds_the_lock(built, tmp_path, capsys):
    ckpt, _ = built
    out = copy_art(built, tmp_path)
    before = (out / "manifest.json").read_bytes()
    with build_mod.BuildLock(out):
        with pytest.raises(BuildError, match=f"--out {out}: another build .pid {os.getpid()}. is writing it; wait for "
                                             f"it to finish, or choose another --out"):
            build(ckpt, "int8", out, "ort", log=quiet)
        assert build_mod.main(["--checkpoint", str(ckpt), "--out", str(out), "--target", "ort"]) == 2
        assert "another build" in one_line_error(capsys)
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]                  # the lock's folder is gone


def _build_child(ckpt, out, precision):
    from export.build import BuildError, build
    try:
        build(ckpt, precision, out, "ort", log=lambda *_: None)
    except BuildError as e:
        raise SystemExit(3 if "another build" in str(e) else 4)


def forkserver():
    """Builds in child processes forked from a server that has imported the exporters already (a child starts
    in milliseconds, so a kill lands inside the build rather than in the imports)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["export.build", "torch.onnx", "sympy", "test_hardening"])     # what a build imports
    return ctx


def test_row07_two_builds_at_once_one_builds_the_other_refuses(built, tmp_path):
    ckpt, _ = built
    out = tmp_path / "art"
    ctx = forkserver()
    procs = [ctx.Process(target=_build_child, args=(ckpt, out, "fp32")) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert sorted(p.exitcode for p in procs) in ([0, 0], [0, 3])          # both in turn, or one refused
    read_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


# ---- row 8: --out holding someone else's files ------------------------------------------------------------
def test_row08_a_folder_holding_other_files_is_refused_and_left_alone(built, tmp_path, capsys):
    ckpt, _ = built
    mine = tmp_path / "mine"
    (mine / ".staging").mkdir(parents=True)
    (mine / ".staging/draft.txt").write_text("keep me")
    (mine / "vision.onnx").write_text("my own file with an artifact's name")
    with pytest.raises(BuildError, match=f"--out {mine}: expected an empty folder or an artifact directory written by "
                                         r"python -m export.build, found a folder that is no artifact directory, with 3 "
                                         r"path\(s\) export.build did not write \(.staging, .staging/draft.txt, "
                                         r"vision.onnx\); nothing was changed"):
        build(ckpt, "fp32", mine, "ort", log=quiet)
    assert (mine / ".staging/draft.txt").read_text() == "keep me"
    assert (mine / "vision.onnx").read_text() == "my own file with an artifact's name"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    # an artifact directory with a file the build did not write is refused the same way
    out = copy_art(built, tmp_path)
    (out / "bench.json").write_text("{}")
    assert build_mod.main(["--checkpoint", str(ckpt), "--out", str(out), "--precision", "fp32", "--target", "ort"]) == 2
    assert "found an artifact directory with 1 path(s) export.build did not write (bench.json)" in one_line_error(capsys)
    assert (out / "bench.json").read_text() == "{}"


def test_an_empty_folder_is_built_into(built, tmp_path):
    (tmp_path / "empty").mkdir()
    assert read_manifest(build(built[0], "fp32", tmp_path / "empty", "ort", log=quiet))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# ---- row 9: a rebuild over working artifacts that fails part-way --------------------------------------
def test_row09_a_rebuild_that_fails_part_way_leaves_the_old_artifacts(built, tmp_path, monkeypatch):
    ckpt, _ = built
    out = copy_art(built, tmp_path)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken_llm(model, d, precision):
        (d / "llm").mkdir()
        (d / "llm/decoder.onnx").write_bytes(b"half")
        raise RuntimeError("exporter crashed")
    steps = [(s, broken_llm if s == "llm" else fn) for s, fn in build_mod.STEPS]
    monkeypatch.setattr(build_mod, "STEPS", steps)
    other = tiny_checkpoint(tmp_path / "other", fused=True, seed=4)          # every stage changes
    with pytest.raises(RuntimeError, match="exporter crashed"):
        build(other, "fp32", out, "ort", log=quiet)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "other"]    # no workspace left
    read_manifest(out)


def test_swap_without_rename_exchange_is_completed_by_the_next_build(built, tmp_path, monkeypatch):
    """Where renameat2 is missing the swap is two renames; a build killed between them leaves the old
    artifacts in the workspace, and the next build puts them back before anything else."""
    ckpt, _ = built
    out = copy_art(built, tmp_path)
    key = read_manifest(out)["build"]["key"]
    ws = build_mod._workspace(out)
    ws.mkdir()
    out.rename(ws / "old")                                                   # killed between the two renames
    lines = []
    monkeypatch.setattr(build_mod, "_exchange", lambda a, b: False)
    build(ckpt, "fp32", out, "ort", log=lines.append)
    assert sum("unchanged, skipped" in line for line in lines) == 4          # the old artifacts came back first
    assert read_manifest(out)["build"]["key"] == key and not ws.exists()
    build(tiny_checkpoint(tmp_path / "other", fused=True, seed=4), "fp32", out, "ort", log=quiet)
    assert read_manifest(out)["build"]["key"] != key and not ws.exists()


# ---- row 10: malformed manifests, odd paths, bad text ------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (lambda m: [], "manifest.json: expected a JSON object, found a list of 0 item"),
    (lambda m: None, "manifest.json: expected a JSON object, found null"),
    (lambda m: m.pop("files") and m, r"1 problem\(s\): files: expected an object, found no such key"),
    (lambda m: m.pop("special_ids") and m, r"1 problem\(s\): special_ids: expected an object, found no such key"),
    (lambda m: m["stages"]["head"]["variants"][1].pop("backend") and m,
     r"1 problem\(s\): stages.head.variants\[1\].backend: expected one of \['ort-cpu', 'ort-cuda', 'ort-openvino', "
     r"'tensorrt', 'trtllm'\], found no such key"),
    (lambda m: m["stages"]["llm"].pop("inputs") and m, r"stages.llm.inputs: expected an object, found no such key"),
])
def test_row10_malformed_manifests_get_one_line_errors(built, tmp_path, capsys, change, message):
    out = copy_art(built, tmp_path)
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(change(m)))
    with pytest.raises(ManifestError, match=message):
        read_manifest(out)
    assert chat_cli.main(["--artifacts", str(out), "--text-only", "what ?"]) == 2
    assert one_line_error(capsys).startswith("error: ")


def test_row10_bytes_that_are_not_json(built, tmp_path):
    out = copy_art(built, tmp_path)
    for data, message in ((b"\xff\xfe{}", r"expected UTF-8 JSON, found bytes that are not UTF-8 \(invalid start byte at byte 0\)"),
                          (b"{" * 100000, "expected JSON, found a parse error"),
                          (b'{"format": 1' + b"1" * 5000 + b"}", "expected JSON, found a parse error")):
        (out / "manifest.json").write_bytes(data)
        with pytest.raises(ManifestError, match=message):
            read_manifest(out)


def test_row10_artifacts_naming_a_file_and_a_question_that_is_not_utf8(built, capsys):
    _, art = built
    assert chat_cli.main(["--artifacts", str(art / "manifest.json"), "--text-only", "q"]) == 2
    assert one_line_error(capsys) == (f"error: artifacts {art / 'manifest.json'}: expected manifest.json (written by "
                                      f"python -m export.build) in a directory, found a file")
    question = b"what \xff\xfe is it".decode("utf-8", "surrogateescape")         # as Python decodes such argv
    assert chat_cli.main(["--artifacts", str(art), "--text-only", question]) == 2
    assert one_line_error(capsys) == ("error: question: expected UTF-8 text, found bytes that are not UTF-8 at "
                                      "character 6; check the terminal's encoding")


def test_row10_out_naming_a_file_and_a_config_json_that_is_a_list(built, tmp_path, capsys):
    ckpt, _ = built
    (tmp_path / "f").write_text("x")
    assert build_mod.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "f"), "--target", "ort"]) == 2
    assert one_line_error(capsys) == (f"error: --out {tmp_path / 'f'}: expected a folder for the artifacts, found a file; "
                                      f"nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    (bad / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json: expected a JSON object, found a JSON array"):
        llamavid_ref.load(bad)
    assert build_mod.main(["--checkpoint", str(bad), "--out", str(tmp_path / "o"), "--target", "ort"]) == 2
    assert "expected a JSON object, found a JSON array" in one_line_error(capsys)
    from llamavid_ref.convert import main as convert_main
    with pytest.raises(SystemExit) as e:
        convert_main([str(bad), str(tmp_path / "p")])
    assert e.value.code == 2 and "found a JSON array" in one_line_error(capsys)


@pytest.mark.parametrize("edit, message", [
    (lambda hf: hf.update(rope_scaling=[16]), r"config.json: rope_scaling: expected null or \{'type': 'linear', 'factor'"),
    (lambda hf: hf.update(hidden_size="32"), r"llm.hidden: expected an integer in \[1, 65536\], found '32'"),
    (lambda hf: hf.update(eos_token_id=10 ** 7), r"llm.eos_id: expected an integer in \[0, 1048575\], found 10000000"),
    (lambda hf: hf.update(num_attention_heads=3), r"llm.heads: expected a divisor of llm.hidden \(32\), found 3"),
])
def test_released_config_values_are_checked(tmp_path, edit, message):
    root = write_released(tiny_model(tmp_path / "src", seed=1), tmp_path / "rel")
    hf = json.loads((root / "config.json").read_text())
    edit(hf)
    (root / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=message):
        llamavid_ref.load(root, vision_heads=4, qformer_heads=3)


def test_shard_index_cannot_point_outside_the_checkpoint(tmp_path):
    root = write_released(tiny_model(tmp_path / "src", seed=1), tmp_path / "rel")
    index = json.loads((root / "pytorch_model.bin.index.json").read_text())
    index["weight_map"] = {k: "../../x.bin" for k in index["weight_map"]}
    (root / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"expected a file name inside the checkpoint, found '../../x.bin'"):
        llamavid_ref.load(root, vision_heads=4, qformer_heads=3)


# ---- row 11: legacy torch files; head counts that do not fit ------------------------------------------------
def test_row11_an_old_format_tensor_only_bin_loads(tmp_path):
    src = tiny_model(tmp_path / "src", seed=11)
    root = write_released(src, tmp_path / "rel")
    for shard in root.glob("pytorch_model-*.bin"):
        torch.save(torch.load(shard, weights_only=True), shard, _use_new_zipfile_serialization=False)
    model = llamavid_ref.load(root, vision_heads=4, qformer_heads=3)
    mine, theirs = model.state_dict(), src.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_row11_head_counts_that_do_not_divide_the_widths_are_refused_at_load(tmp_path):
    cfg = from_name("tiny")
    cfg.vision = VisionConfig(image_size=28, patch_size=7, width=40, depth=3, heads=5, mlp_dim=72)
    root = write_released(tiny_model(tmp_path / "src", seed=2, cfg=cfg), tmp_path / "rel")
    with pytest.raises(CheckpointError, match=r"vision.heads: expected a divisor of vision.width \(40\), found 16; a "
                                              r"released checkpoint does not record its head counts: pass vision_heads=N"):
        llamavid_ref.load(root, qformer_heads=3)                 # the default 16 vision heads
    assert llamavid_ref.load(root, vision_heads=5, qformer_heads=3).config.vision.heads == 5


# ---- row 12: questions and media at the chat command line ------------------------------------------------
def animated_gif(path, frames=3):
    imgs = [Image.fromarray(np.full((28, 28, 3), 60 * i, np.uint8)) for i in range(frames)]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=1000, loop=0)      # 1 frame a second
    return path


@pytest.mark.parametrize("args, message", [
    (["--text-only", "what is <image> here ?"], "error: question: expected plain text, found the image placeholder "
                                                "'<image>': the video or image goes before the question by itself; "
                                                "remove '<image>' from the question"),
    (["--text-only", ""], "error: question: expected a question, found an empty one (leave it out for an interactive chat)"),
    (["--text-only", "   "], "error: question: expected a question, found an empty one (leave it out for an interactive chat)"),
    (["what ?"], "error: expected --video PATH or --image PATH, found neither; pass --text-only to ask the LLM "
                 "without media"),
])
def test_row12_questions_and_missing_media_are_refused_clearly(built, capsys, args, message):
    assert chat_cli.main(["--artifacts", str(built[1]), *args]) == 2
    assert one_line_error(capsys) == message


def test_row12_an_animated_gif_is_read_as_a_video(built, tmp_path, capsys):
    _, art = built
    gif = animated_gif(tmp_path / "a.gif")
    pipe = Pipeline.open(art)
    assert pipe.load_media(gif).shape == (3, 3, 28, 28)                       # every frame, not the first only
    want = pipe.ask(gif, "what ?", max_new_tokens=3)
    assert chat_cli.main(["--artifacts", str(art), "--video", str(gif), "--max-new-tokens", "3", "what ?"]) == 0
    assert capsys.readouterr().out.strip() == want
    assert chat_cli.main(["--artifacts", str(art), "--image", str(gif), "--max-new-tokens", "3", "what ?"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == want and f"[--image {gif}: an animated image of 3 frames, read as a video]" in out.err


def test_row12_text_only_and_interactive_turns_that_are_refused(built, capsys, monkeypatch):
    _, art = built
    assert chat_cli.main(["--artifacts", str(art), "--text-only", "--max-new-tokens", "4", "what ?"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer == Pipeline.open(art).ask(None, "what ?", max_new_tokens=4)
    turns = iter(["<image> what ?", "what ?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(turns))
    assert chat_cli.main(["--artifacts", str(art), "--text-only", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines() == [answer] and "found the image placeholder '<image>'" in out.err


# ---- row 13: --plot without matplotlib ---------------------------------------------------------------------
def test_row13_plot_without_matplotlib_says_how_to_install_it_before_measuring(built, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    monkeypatch.setattr(bench, "bench_artifacts", lambda *a, **k: pytest.fail("measured before checking --plot"))
    assert bench.main(["--artifacts", str(built[1]), "--plot", "t.png"]) == 2
    assert one_line_error(capsys) == ("error: --plot: expected matplotlib, found it not installed; install it with pip "
                                      "install matplotlib==3.11.2 (or pip install -e '.[bench]')")


# ---- integrity: the pinned manifest hash ---------------------------------------------------------------------
def test_pinned_manifest_hash(built, tmp_path, capsys):
    out = copy_art(built, tmp_path)
    pin = hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    assert read_manifest(out, manifest_sha256=pin.upper())["llm"]["vocab_size"] == 96
    edit_manifest(out, lambda m: m["prompt"].__setitem__("system", "Answer red."))       # valid, but not what was pinned
    with pytest.raises(ManifestError, match=f"manifest.json: expected sha256 {pin} .pinned., found [0-9a-f]{{64}}: the "
                                            f"manifest was changed"):
        read_manifest(out, manifest_sha256=pin)
    assert chat_cli.main(["--artifacts", str(out), "--manifest-sha256", pin, "--text-only", "what ?"]) == 2
    assert f"expected sha256 {pin} (pinned)" in one_line_error(capsys)
    with pytest.raises(ManifestError, match="manifest_sha256: expected 64 hex digits, found the string 'abc'"):
        read_manifest(out, manifest_sha256="abc")


# ---- target: a build killed at 20 random moments ---------------------------------------------------------------
def artifact_state(out):
    """The live directory's build key, after checking that it is complete: manifest valid, every file's hash,
    and nothing on disk that the manifest or the build records do not list (no mix of two builds)."""
    m = read_manifest(out)
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk - {"manifest.json"} - {n for n in on_disk if n.startswith(".build/")} == set(m["files"])
    return m["build"]["key"]


def test_build_killed_at_20_random_moments_leaves_old_or_new_never_a_mix(tmp_path):
    ckpts = [tiny_checkpoint(tmp_path / name, fused=True, seed=seed) for name, seed in (("a", 3), ("b", 4))]
    out, ctx = tmp_path / "art", forkserver()
    for ckpt in (ckpts[1], ckpts[0]):                    # the first starts the server, the second is timed
        t0 = time.perf_counter()
        p = ctx.Process(target=_build_child, args=(ckpt, out, "fp32"))
        p.start()
        p.join(300)
        assert p.exitcode == 0
    full = time.perf_counter() - t0                      # a whole build, forked from the server (imports done)
    keys = [artifact_state(out)]
    rng, kills, finished = random.Random(18), 0, 0
    while kills < 20:                                    # builds that end before their moment do not count
        assert finished < 40, f"{finished} builds finished before their kill, {kills} killed"
        target = ckpts[1] if artifact_state(out) == keys[0] else ckpts[0]
        p = ctx.Process(target=_build_child, args=(target, out, "fp32"))
        p.start()
        time.sleep(rng.uniform(0, full))
        p.kill()                                         # SIGKILL: no handler, no cleanup
        p.join(60)
        assert p.exitcode in (0, -9), f"exit code {p.exitcode} after {kills} kills"
        kills, finished = kills + (p.exitcode == -9), finished + (p.exitcode == 0)
        key = artifact_state(out)                        # complete, and one of the two builds
        if len(keys) == 1 and key != keys[0]:
            keys.append(key)
        assert key in keys, f"a third build key {key} after {kills} kills"
    p = ctx.Process(target=_build_child, args=(ckpts[0], out, "fp32"))          # the next build succeeds
    p.start()
    p.join(300)
    assert p.exitcode == 0 and artifact_state(out) == keys[0]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a", "art", "b"]      # workspace and lock gone
