"""Per-stage shapes, token counts, and the dual-token head against independent formulations."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from llamavid_ref.config import HeadConfig, VisionConfig, from_name
from llamavid_ref.head import context_attention, pool_content
from llamavid_ref.model import LlamaVid
from llamavid_ref.vision import EvaViT, interpolate_pos_embed
from llamavid_ref.tiny import random_init

RTOL = 1e-5


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("preset,per_frame", [
    ("llama-vid-7b-full-224-video-fps-1", 2), ("llama-vid-7b-full-336", 577),
    ("llama-vid-7b-full-224-long-video", 2), ("llama-vid-13b-full-336", 577)])
def test_released_presets_token_counts(preset, per_frame):
    assert from_name(preset).tokens_per_frame == per_frame


@pytest.mark.parametrize("size,compress,expected", [(224, None, 257), (336, None, 577), (224, "mean", 2),
                                                    (224, "grid:4", 17), (336, "grid:2", 5)])
def test_frame_tokens_shape_at_real_resolutions(size, compress, expected):
    """A narrow model at the released resolutions: [F, n+1, H] with n from the pooling mode."""
    cfg = from_name("tiny")
    cfg.vision = VisionConfig(image_size=size, patch_size=14, width=16, depth=1, heads=2, mlp_dim=32)
    cfg.head = HeadConfig(compress_type=compress)
    model = random_init(LlamaVid(cfg)).eval()
    ids = torch.tensor([[2, 7, 9, 3]])
    with torch.no_grad():
        feats = model.vision(torch.randn(3, 3, size, size))
        out = model.encode_frames(torch.randn(3, 3, size, size), ids)
    assert feats.shape == (3, (size // 14) ** 2 + 1, 16)
    assert out.shape == (3, expected, cfg.llm.hidden)


def test_context_attention_matches_algorithm_1_loops():
    """Paper Algorithm 1 with the release's key projector, written as explicit float64 loops."""
    g = torch.Generator().manual_seed(1)
    Fr, Q, N, C = 3, 5, 9, 12
    text_q, keys, patches = (torch.randn(Fr, s, C, generator=g) for s in (Q, N, N))
    out = context_attention(text_q, keys, patches)
    tq, k, p = (t.double().numpy() for t in (text_q, keys, patches))
    expected = np.zeros((Fr, 1, C))
    for f in range(Fr):
        for q in range(Q):
            s = np.array([tq[f, q] @ k[f, n] for n in range(N)]) / np.sqrt(C)
            a = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            expected[f, 0] += sum(a[n] * p[f, n] for n in range(N)) / Q
    assert out.shape == (Fr, 1, C)
    assert rel_err(out, expected) < RTOL


def test_head_composition_context_first_then_content():
    """frame_tokens = [val_proj(ctx), mm_projector(mean patches)], recomputed independently from the
    head's parameters in float64 numpy."""
    model = random_init(LlamaVid(from_name("tiny"))).eval()
    head = model.head
    feats = torch.randn(4, 17, 32)
    ids, mask = torch.tensor([[2, 5, 6, 3, 0]]).expand(4, -1), torch.tensor([[1, 1, 1, 1, 0]]).expand(4, -1)
    with torch.no_grad():
        out = head(feats, ids, mask).double().numpy()
        text_q = head.text_queries(feats, ids, mask).double().numpy()
    P = {k: v.double().numpy() for k, v in head.state_dict().items()}
    patches = feats[:, 1:].double().numpy()
    keys = patches @ P["key_projector.weight"].T + P["key_projector.bias"]
    s = text_q @ keys.transpose(0, 2, 1) / np.sqrt(32)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    ctx = (a @ patches).mean(1)                                            # [F,C]
    ctx_tok = ctx @ P["val_projector.weight"].T + P["val_projector.bias"]
    erf = np.vectorize(math.erf)                                           # exact GELU
    h = patches.mean(1) @ P["mm_projector.0.weight"].T + P["mm_projector.0.bias"]
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    content = h @ P["mm_projector.2.weight"].T + P["mm_projector.2.bias"]
    assert out.shape == (4, 2, 32)
    assert rel_err(out[:, 0], ctx_tok) < RTOL
    assert rel_err(out[:, 1], content) < RTOL


def test_grid_pooling_is_block_average():
    patches = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)
    pooled = pool_content(patches, "grid:2")                               # 4x4 grid -> 2x2 blocks
    grid = patches.reshape(2, 4, 4, 3).numpy()
    expected = np.stack([grid[:, r:r + 2, c:c + 2].mean((1, 2)) for r in (0, 2) for c in (0, 2)], 1)
    assert pooled.shape == (2, 4, 3)
    np.testing.assert_allclose(pooled.numpy(), expected, rtol=1e-6)
    assert pool_content(patches, None) is patches
    np.testing.assert_allclose(pool_content(patches, "mean").numpy(), patches.numpy().mean(1, keepdims=True), rtol=1e-6)


def test_eva_qkv_bias_has_zero_k_bias():
    """Changing v_bias changes the output; the k bias is structurally zero (q_bias shifts scores)."""
    cfg = VisionConfig(image_size=28, patch_size=14, width=8, depth=1, heads=2, mlp_dim=16)
    vit = random_init(EvaViT(cfg)).eval()
    attn = vit.blocks[0].attn
    x = torch.randn(1, 5, 8)
    qkv = torch.nn.functional.linear(x, attn.qkv.weight)
    bias = torch.cat([attn.q_bias, torch.zeros(8), attn.v_bias])
    q, k, v = (qkv + bias).reshape(1, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    ref = attn.proj((((q * 4 ** -0.5) @ k.transpose(-1, -2)).softmax(-1) @ v).transpose(1, 2).reshape(1, 5, 8))
    torch.testing.assert_close(attn(x), ref, rtol=RTOL, atol=0)


def test_pos_embed_interpolation_16_to_24_keeps_cls():
    pe = torch.randn(1, 257, 6)
    out = interpolate_pos_embed(pe, 24)
    assert out.shape == (1, 577, 6)
    assert torch.equal(out[:, 0], pe[:, 0])
    assert interpolate_pos_embed(pe, 16) is pe
    # A constant grid stays constant under bicubic interpolation.
    flat = torch.cat([pe[:, :1], torch.full((1, 256, 6), 0.5)], 1)
    torch.testing.assert_close(interpolate_pos_embed(flat, 24)[:, 1:], torch.full((1, 576, 6), 0.5))


def test_vision_rejects_wrong_resolution():
    vit = EvaViT(dataclasses.replace(from_name("tiny").vision))
    with pytest.raises(ValueError, match=r"expected pixel_values \[F,3,28,28\], found \[2, 3, 32, 32\]"):
        vit(torch.zeros(2, 3, 32, 32))


@pytest.mark.parametrize("tokens,per_frame", [("both", 2), ("context", 1), ("content", 1)])
def test_ablation_heads_keep_their_tokens(tokens, per_frame):
    cfg = from_name("tiny")
    cfg.head.tokens = tokens
    model = random_init(LlamaVid(cfg)).eval()
    both = random_init(LlamaVid(from_name("tiny"))).eval()
    px, ids = torch.randn(3, 3, 28, 28), torch.tensor([[2, 7, 9, 3]])
    with torch.no_grad():
        out, ref = model.encode_frames(px, ids), both.encode_frames(px, ids)
    assert cfg.tokens_per_frame == per_frame and out.shape == (3, per_frame, 32)
    expected = {"both": ref, "context": ref[:, :1], "content": ref[:, 1:]}[tokens]
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
