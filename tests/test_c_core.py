"""The C core: its own C unit test (toy backend, allocation counting) built and run here, plainly and under
-fsanitize=address,undefined; its sampler against the reference's; one opened pipeline shared by threads;
the runtime without torch; errors from a stage that fails in the middle of an answer."""
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import llamavid_ref
from export.build import build
from llamavid_ref.sampling import Rng, sample
from runtime import _llamavid
from runtime.pipeline import Pipeline
from test_export_build import quiet, tiny_checkpoint
from test_runtime_media import run_without_torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "runtime" / "csrc"
CORE = ["error.c", "json.c", "sha256.c", "config.c", "model.c", "session.c", "sampler.c", "stream.c"]
WRAP = "-Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc"


def build_and_run(tmp_path, flags: list[str]) -> str:
    exe = tmp_path / "test_core"
    cmd = ["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", *flags, f"-I{CSRC}", *[str(CSRC / f) for f in CORE],
           str(CSRC / "tests" / "test_core.c"), "-o", str(exe), "-lm", WRAP]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "halt_on_error=1"})
    assert run.returncode == 0 and run.stderr == "", run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc")
def test_c_unit_test(tmp_path):
    """Sampler and RNG, prompt layout and frame chunks on both KV layouts (with and without a prefill graph,
    in one llm call or in batches), rollback, stop tokens, every error path, no heap allocation per token."""
    out = build_and_run(tmp_path, ["-O2"])
    assert out.strip().endswith(", 0 failures") and int(out.split()[-4]) > 1300, out


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc")
def test_c_unit_test_under_address_and_undefined_sanitizers(tmp_path):
    out = build_and_run(tmp_path, ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"])
    assert out.strip().endswith(", 0 failures"), out


def test_sampler_matches_the_reference_sampler():
    """3,000 random cases (ties, penalties in both directions, top-k, top-p, temperatures): the C sampler and
    llamavid_ref.sampling pick the same token from the same RNG stream, 3 draws each."""
    rng = np.random.default_rng(1)
    r = Rng(9)
    assert _llamavid.rng_doubles(9, 4) == [r.next_double() for _ in range(4)]
    for trial in range(3000):
        V = int(rng.integers(2, 300))
        logits = (rng.standard_normal(V) * rng.uniform(0.1, 8)).astype(np.float32)
        if trial % 5 == 0:
            logits[rng.integers(0, V, 3)] = logits.max()
        kw = dict(temperature=float(rng.choice([0, 0.2, 0.7, 1.0, 1.5])), top_k=int(rng.choice([0, 1, 5, 40])),
                  top_p=float(rng.choice([0.1, 0.7, 0.95, 1.0])), repetition_penalty=float(rng.choice([1.0, 1.3, 0.8])))
        history = rng.integers(-5, V + 5, int(rng.integers(0, 20))).astype(np.int32)
        seed = int(rng.integers(0, 2 ** 63))
        c, py = _llamavid.Sampler(V, seed=seed, **kw), Rng(seed)
        for _ in range(3):
            assert c.sample(logits, history) == sample(logits, history=history.tolist(), rng=py, **kw), (trial, kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("core")
    ckpt = tiny_checkpoint(root, fused=True, seed=7)
    return build(ckpt, "fp32", root / "art", "ort", log=quiet), ckpt


QUESTIONS = ["what color is the square ?", "how many shapes are there ?", "what moves left ?", "where is it ?"]


def test_threads_sharing_one_pipeline_give_the_answers_of_one_thread(tiny):
    """8 threads x 50 questions on one opened Pipeline (greedy and seeded sampling mixed) give exactly the
    answers one thread gives, question by question."""
    art, _ = tiny
    pipe = Pipeline.open(art)
    g = np.random.default_rng(3)
    videos = [g.standard_normal((n, 3, 28, 28)).astype(np.float32) for n in (1, 2, 5, 9)]
    jobs = [(videos[i % 4], QUESTIONS[i % 3], dict(max_new_tokens=10, do_sample=i % 2 == 1, temperature=0.9,
                                                   top_p=0.8, seed=i)) for i in range(50)]
    want = [pipe.ask(v, q, **kw) for v, q, kw in jobs]
    got = [[None] * 50 for _ in range(8)]

    def worker(t):
        for i in range(50):
            k = (i + 7 * t) % 50                      # every thread in its own order
            got[t][k] = pipe.ask(*jobs[k][:2], **jobs[k][2])

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(g == want for g in got)
    assert len(set(want)) > 3                          # the questions give different answers


def test_pipeline_without_torch(tiny):
    """import runtime and Pipeline.open(...).ask(...) in an interpreter where torch, llamavid_ref and export
    cannot be imported; the answer is the reference's."""
    art, ckpt = tiny
    video = np.random.default_rng(5).standard_normal((3, 3, 28, 28)).astype(np.float32)
    np.save(art.parent / "video.npy", video)
    out = run_without_torch(f"""
import numpy as np
from runtime import Pipeline
p = Pipeline.open({str(art)!r})
print(p.ask(np.load({str(art.parent / 'video.npy')!r}), {QUESTIONS[1]!r}, max_new_tokens=12))
assert not any(m.split('.')[0] in ('torch', 'llamavid_ref', 'export') for m in sys.modules)
""")
    assert out.strip() == llamavid_ref.load(ckpt).ask(torch.from_numpy(video), QUESTIONS[1], max_new_tokens=12)


def test_every_runtime_module_imports_without_torch():
    out = run_without_torch("""
import pkgutil, importlib, runtime
names = sorted(m.name for m in pkgutil.walk_packages(runtime.__path__, 'runtime.'))
for name in names:
    importlib.import_module(name)
assert not any(m.split('.')[0] in ('torch', 'llamavid_ref', 'export') for m in sys.modules)
print(len(names))
""")
    assert int(out) >= 10


class Failing:
    """A stage that fails on its n-th call, then works again (wraps a real ORT stage)."""

    def __init__(self, stage, n):
        self.stage, self.n, self.calls = stage, n, 0

    def new_context(self):
        return self.stage.new_context()

    def run(self, inputs, outputs, ctx):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("device lost")
        self.stage.run(inputs, outputs, ctx)


def test_a_stage_failing_mid_answer_is_an_error_and_the_pipeline_goes_on(tiny):
    art, ckpt = tiny
    pipe = Pipeline.open(art)
    video = np.random.default_rng(2).standard_normal((2, 3, 28, 28)).astype(np.float32)
    want = pipe.ask(video, QUESTIONS[0], max_new_tokens=10)
    pipe.core = _llamavid.Model(str(art), {k: (pipe.chosen[k]["index"], Failing(s, 4) if k == "llm" else s)
                                           for k, s in pipe.stages.items()})
    pipe._idle.clear()                                 # sessions belong to the model they were made on
    with pytest.raises(RuntimeError, match=r"stage llm \(llm/decoder.onnx fp32 on python\): run: RuntimeError: device lost"):
        pipe.ask(video, QUESTIONS[0], max_new_tokens=10)
    assert pipe.ask(video, QUESTIONS[0], max_new_tokens=10) == want


def test_session_handles_and_capacity(tiny):
    art, _ = tiny
    pipe = Pipeline.open(art)
    s = _llamavid.Session(pipe.core, n_ctx=16)
    ids = np.asarray(pipe.encode_prompt(pipe.prompt_text([(0, "what ?"), (1, None)])), np.int32)
    with pytest.raises(ValueError, match=r"llm: KV cache: the prompt needs \d+ positions after the 0 held, the "
                                         r"session holds 16"):
        s.prompt(ids)
    with pytest.raises(ValueError, match="expected int32, found format 'l'"):
        s.prompt(ids.astype(np.int64))
    with pytest.raises(RuntimeError, match="expected logits, found none: prompt the session first"):
        s.next(_llamavid.Sampler(pipe.info["vocab_size"]))
    s.prompt(ids[:5])
    assert s.position == 5 and s.kv_info()["capacity"] == 16
    s.close()
    with pytest.raises(ValueError, match="expected an open session, found a closed one"):
        s.prompt(ids[:5])
