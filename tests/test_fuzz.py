"""Fuzzing (issue 18): the manifest reader, the checkpoint loader's header parsing (safetensors and torch
files, config.json) and the video loaders (the reference's and runtime.media's) fed random and mutated
inputs. Every outcome must be a result or the loader's own clear error (a ValueError subclass with
"expected" in it); anything else, a crash or a hang fails. Each target runs FUZZ_CASES cases
(derandomized: the same cases on every run, so CI is reproducible; FUZZ_SEED=n draws other cases,
FUZZ_CASES=n another count). A watchdog ends the process if a target hangs."""
import copy
import faulthandler
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import llamavid_ref
from export.build import build
from llamavid_ref import CheckpointError, checkpoint
from llamavid_ref.video import VideoError, load_video, write_video
from runtime import media
from runtime.backends import choose_variant
from runtime.manifest import BACKENDS, ManifestError, read_manifest
from runtime.pipeline import frame_chunk
from test_export_build import quiet, tiny_checkpoint

FUZZ_CASES = int(os.environ.get("FUZZ_CASES", 2000))
HANG_SECONDS = 600                       # per target; a case takes milliseconds
SETTINGS = settings(max_examples=FUZZ_CASES, deadline=None, database=None, derandomize="FUZZ_SEED" not in os.environ,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def fuzz(case):
    """A target's case function under SETTINGS, drawing from st.data() (FUZZ_SEED=n: other cases, seeded)."""
    case = SETTINGS(given(data=st.data())(case))
    return seed(int(os.environ["FUZZ_SEED"]))(case) if "FUZZ_SEED" in os.environ else case


def run_cases(test) -> int:
    """Run a hypothesis test under a watchdog; -> the number of cases it ran."""
    count = [0]
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    try:
        test(count)
    finally:
        faulthandler.cancel_dump_traceback_later()
    return count[0]


def result_or_clean_error(load, kind):
    """load()'s result, or None when it raised the loader's own error `kind` with a one-line message saying
    what was expected; any other exception propagates and fails the case."""
    try:
        return load()
    except kind as e:
        assert "expected" in str(e) and "\n" not in str(e).strip(), e
        return None


# ---- mutations ------------------------------------------------------------------------------------
EDIT = st.tuples(st.sampled_from(("flip", "overwrite", "insert", "delete", "truncate")),
                 st.floats(0, 1), st.binary(min_size=1, max_size=24))


def apply_edits(data: bytes, edits, region: int | None = None) -> bytes:
    """Byte edits at relative positions (within the first `region` bytes when given: a file's header)."""
    b = bytearray(data)
    for kind, where, chunk in edits:
        at = int(where * min(len(b), region or len(b)))
        if kind == "flip" and at < len(b):
            b[at] ^= chunk[0] or 0x80
        elif kind == "overwrite":
            b[at:at + len(chunk)] = chunk
        elif kind == "insert":
            b[at:at] = chunk
        elif kind == "delete":
            del b[at:at + len(chunk)]
        else:
            del b[at:]
    return bytes(b)


INTERESTING = st.sampled_from([None, True, False, 0, -1, 1, 2 ** 31, 2 ** 63, -(2 ** 63), 10 ** 30, 0.5, -0.0, 1e308,
                               math.inf, -math.inf, math.nan, "", "2", "/etc/passwd", "../../x", "a/../../b", "llm/../..",
                               "C:\\x", "~/x", "<image>", "\x00", "\udcff", [], {}, [1, 2, 3], ["a"], {"": None}]
                             ).map(copy.deepcopy)          # a fresh list or object each time: later edits change it
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | INTERESTING,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=8)


def mutate_tree(tree, data, rounds: int = 3):
    """Up to `rounds` random edits of a JSON tree: a value replaced, a key deleted or added, a list item dropped."""
    tree = copy.deepcopy(tree)
    for _ in range(data.draw(st.integers(1, rounds))):
        parent, key, node = None, None, tree
        while isinstance(node, (dict, list)) and node and data.draw(st.integers(0, 4)):    # walk down, 4 in 5
            parent, key = node, data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            node = node[key]
        if parent is None:
            return data.draw(JSON) if data.draw(st.integers(0, 9)) == 0 else tree
        op = data.draw(st.sampled_from(("replace", "replace", "delete", "add")))
        if op == "replace":
            parent[key] = data.draw(JSON)
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=8))] = data.draw(JSON)
        else:
            parent.append(data.draw(JSON))
    return tree


# ---- target 1: the manifest reader ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return build(tiny_checkpoint(root, fused=True, seed=3), "fp32", root / "art", "ort", log=quiet)


def test_fuzz_manifest_reader(artifacts, tmp_path):
    out = tmp_path / "art"
    shutil.copytree(artifacts, out)
    text = (out / "manifest.json").read_bytes()
    valid = json.loads(text)
    (out / "escape").symlink_to("/etc")                  # a link that leads out, for paths to find
    accepted = []

    def test(count):
        @fuzz
        def case(data):
            kind = data.draw(st.sampled_from(("tree", "tree", "tree", "text", "bytes")))
            if kind == "tree":
                raw = json.dumps(mutate_tree(valid, data)).encode("utf-8", "surrogatepass")
            elif kind == "text":
                raw = apply_edits(text, data.draw(st.lists(EDIT, min_size=1, max_size=6)))
            else:
                raw = data.draw(st.binary(max_size=512))
            (out / "manifest.json").write_bytes(raw)
            count[0] += 1
            m = result_or_clean_error(lambda: read_manifest(out), ManifestError)
            if m is None:
                return
            accepted.append(kind)
            # what the runtime reads of an accepted manifest works (no KeyError/TypeError past validation)
            chosen = {s: choose_variant(m["stages"][s]["variants"], list(BACKENDS)) for s in ("vision", "head", "llm")}
            if all(chosen.values()):
                assert frame_chunk(m, chosen) >= 1
        case()
    assert run_cases(test) >= FUZZ_CASES
    assert accepted, "no mutated manifest was accepted: the mutations only test the JSON parser"


# ---- target 2: the checkpoint loader's headers ------------------------------------------------------------
def safetensors_seed(path: Path) -> bytes:
    from safetensors.torch import save_file
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16),
               "c": torch.zeros(1, 1, 2, dtype=torch.bfloat16)}, str(path))
    return path.read_bytes()


def header_mutation(seed: bytes, data) -> bytes:
    """A safetensors file whose JSON header is mutated as a tree, its length prefix right or not."""
    n = int.from_bytes(seed[:8], "little")
    header = mutate_tree(json.loads(seed[8:8 + n]), data)
    body = json.dumps(header).encode("utf-8", "surrogatepass")
    size = len(body) if data.draw(st.integers(0, 3)) else data.draw(st.integers(0, 2 ** 64 - 1))
    return size.to_bytes(8, "little") + body + seed[8 + n:]


def test_fuzz_checkpoint_weight_headers(tmp_path):
    st_seed = safetensors_seed(tmp_path / "seed.safetensors")
    torch.save({"x": torch.ones(3), "y": torch.zeros(2, 2)}, tmp_path / "seed.bin")
    bin_seed = (tmp_path / "seed.bin").read_bytes()
    torch.save({"x": torch.ones(3)}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    legacy_seed = (tmp_path / "legacy.bin").read_bytes()
    read = []

    def test(count):
        @fuzz
        def case(data):
            kind = data.draw(st.sampled_from(("header", "header", "st-bytes", "bin", "legacy", "random")))
            if kind == "header":
                raw, name = header_mutation(st_seed, data), "w.safetensors"
            elif kind == "st-bytes":
                n = int.from_bytes(st_seed[:8], "little")
                raw, name = apply_edits(st_seed, data.draw(st.lists(EDIT, min_size=1, max_size=6)), 8 + n), "w.safetensors"
            elif kind in ("bin", "legacy"):
                seed = bin_seed if kind == "bin" else legacy_seed
                raw, name = apply_edits(seed, data.draw(st.lists(EDIT, min_size=1, max_size=4))), "w.bin"
            else:
                raw, name = data.draw(st.binary(max_size=256)), data.draw(st.sampled_from(("w.safetensors", "w.bin")))
            path = tmp_path / name
            path.write_bytes(raw)
            count[0] += 1
            sd = result_or_clean_error(lambda: checkpoint._read_file(path), CheckpointError)
            if sd is None:
                return
            assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())
            read.append(kind)
        case()
    assert run_cases(test) >= FUZZ_CASES
    assert {"header", "bin"} & set(read), "no mutated file was readable: the mutations only test the first checks"


def test_fuzz_checkpoint_config_json(tmp_path):
    """config.json (project format) mutated, with valid weights: refused with CheckpointError, or a model
    whose configuration passes the limits."""
    ckpt = tiny_checkpoint(tmp_path, fused=False, seed=5)
    text = (ckpt / "config.json").read_bytes()
    valid = json.loads(text)
    loaded = []

    def test(count):
        @fuzz
        def case(data):
            if data.draw(st.integers(0, 4)):
                raw = json.dumps(mutate_tree(valid, data)).encode("utf-8", "surrogatepass")
            else:
                raw = apply_edits(text, data.draw(st.lists(EDIT, min_size=1, max_size=4)))
            (ckpt / "config.json").write_bytes(raw)
            count[0] += 1
            model = result_or_clean_error(lambda: llamavid_ref.load(ckpt), CheckpointError)
            if model is None:
                return
            assert not llamavid_ref.config.problems(model.config)
            loaded.append(1)
        case()
    assert run_cases(test) >= FUZZ_CASES
    assert loaded, "no mutated config.json loaded"


# ---- target 3: the video loader --------------------------------------------------------------------------
def video_seeds(root: Path) -> list[bytes]:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    seeds = []
    for name, codec in (("a.mp4", None), ("b.mkv", "mpeg4")):
        write_video(root / name, frames, fps=2, codec=codec)
        seeds.append((root / name).read_bytes())
    return seeds


def test_fuzz_video_loader(tmp_path):
    seeds = video_seeds(tmp_path)
    decoded = []

    def test(count):
        @fuzz
        def case(data):
            kind = data.draw(st.sampled_from(("edit", "edit", "edit", "random")))
            if kind == "edit":
                seed = seeds[data.draw(st.integers(0, len(seeds) - 1))]
                raw = apply_edits(seed, data.draw(st.lists(EDIT, min_size=1, max_size=6)))
            else:
                raw = data.draw(st.binary(max_size=512))
            path = tmp_path / f"v{data.draw(st.sampled_from(('.mp4', '.mkv', '.avi', '')))}"
            path.write_bytes(raw)
            count[0] += 1
            partial = data.draw(st.booleans())
            clip = result_or_clean_error(lambda: load_video(path, allow_partial=partial), VideoError)   # the reference's
            if clip is not None:
                T = len(clip.frames)
                assert clip.frames.dtype == np.uint8 and clip.frames.ndim == 4 and clip.frames.shape[-1] == 3 and T >= 1
                assert clip.timestamps.shape == (T,) and clip.indices.shape == (T,)
                decoded.append(kind)
            loaded = result_or_clean_error(                 # the runtime's (torch-free, preprocessing as it decodes)
                lambda: media.load_video(path, 28, (0.5,) * 3, (0.25,) * 3, allow_partial=partial), media.VideoError)
            if loaded is not None:
                px, times = loaded
                assert px.dtype == np.float32 and px.shape[1:] == (3, 28, 28) and len(px) >= 1
                assert times.shape == (len(px),)
        case()
    assert run_cases(test) >= FUZZ_CASES
    assert decoded, "no mutated video decoded"
