"""runtime.bench on a tiny artifact directory: the report's rows, the JSON and the plot (seconds, not a benchmark)."""
import json

import pytest

from export.build import build
from runtime import bench
from test_export_build import quiet, tiny_checkpoint


def test_bench_reports_both_systems_side_by_side(tmp_path):
    art = build(tiny_checkpoint(tmp_path, fused=True), "fp32", tmp_path / "art", "ort", log=quiet)
    r = bench.bench_artifacts(art, frames=(1, 2), decode_steps=2, repeats=1)
    for side in ("ort", "torch"):
        assert set(r[side]["ttft_ms_by_frames"]) == {1, 2} and r[side]["decode_tok_s"] > 0
    text = bench.report_artifacts(r)
    assert "| vision+head ms/frame |" in text and "| decode tokens/s |" in text and "| 2 |" in text
    assert json.loads(json.dumps(r, default=str))["frames"] == 2
    pytest.importorskip("matplotlib")
    assert bench.plot_ttft(r, tmp_path / "ttft.png") and (tmp_path / "ttft.png").stat().st_size > 1000


def test_roofline_counts_the_weights_one_decode_step_reads(tmp_path):
    """Every linear of the fused decoder once (q/k/v packed, gate, up, down, o, lm_head); not the rope caches."""
    import llamavid_ref
    from export.llm import export_llm
    model = llamavid_ref.load(tiny_checkpoint(tmp_path, fused=True))
    c = model.config.llm
    path = export_llm(model, tmp_path / "fused.onnx", "fused")
    per_layer = c.hidden * (c.heads + 2 * c.kv_heads) * c.head_dim + c.heads * c.head_dim * c.hidden + 3 * c.hidden * c.ffn
    assert bench.matmul_weight_bytes(path) == 4 * (c.layers * per_layer + c.hidden * c.vocab_size)
