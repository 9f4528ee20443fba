"""Each reference stage against transformers' independent implementation of the same architecture,
with weights taken from the RELEASED names (so the weight map is checked too). fp32, 1e-5 relative."""
import pytest
import torch

from llamavid_ref.checkpoint import released_state_dict
from llamavid_ref.tiny import tiny_model

transformers = pytest.importorskip("transformers")
RTOL = 1e-5


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("m"), seed=3)


def test_qformer_matches_instructblip_qformer(model):
    from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel
    q = model.config.qformer
    hf = InstructBlipQFormerModel(InstructBlipQFormerConfig(
        vocab_size=q.vocab_size, hidden_size=q.hidden, num_hidden_layers=q.layers, num_attention_heads=q.heads,
        intermediate_size=q.ffn, max_position_embeddings=q.max_positions, layer_norm_eps=q.eps,
        encoder_hidden_size=model.config.vision.width, cross_attention_frequency=q.cross_attention_freq,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    released, _ = released_state_dict(model)
    prefix = "model.vlm_att_encoder.bert."
    sd = {k[len(prefix):].replace(".self.", ".attention.").replace("embeddings.LayerNorm", "embeddings.layernorm"): v
          for k, v in released.items() if k.startswith(prefix)}
    hf.load_state_dict(sd, strict=False)
    missing = set(hf.state_dict()) - set(sd) - {"embeddings.position_ids"}
    assert not missing, missing

    Fr = 3
    image = torch.randn(Fr, 17, model.config.vision.width)
    ids = torch.tensor([[2, 9, 11, 14, 3], [2, 8, 3, 0, 0], [2, 5, 6, 7, 3]])
    mask = (ids != 0).long()
    queries = model.head.query.expand(Fr, -1, -1)
    with torch.no_grad():
        ours = model.head.qformer(queries, ids, mask, image)
        theirs = hf(input_ids=ids, attention_mask=torch.cat([torch.ones(Fr, q.num_query, dtype=torch.long), mask], 1),
                    query_embeds=queries, encoder_hidden_states=image).last_hidden_state[:, :q.num_query]
    assert ours.shape == (Fr, q.num_query, q.hidden)
    assert rel_err(ours, theirs) < RTOL


def test_vision_matches_blip2_vision_encoder(model):
    from transformers import Blip2VisionConfig, Blip2VisionModel
    v = model.config.vision
    hf = Blip2VisionModel(Blip2VisionConfig(hidden_size=v.width, intermediate_size=v.mlp_dim,
                                            num_hidden_layers=v.depth, num_attention_heads=v.heads,
                                            image_size=v.image_size, patch_size=v.patch_size,
                                            layer_norm_eps=v.eps, qkv_bias=True)).eval()
    _, eva = released_state_dict(model)
    sd = {"embeddings.class_embedding": eva["cls_token"], "embeddings.position_embedding": eva["pos_embed"],
          "embeddings.patch_embedding.weight": eva["patch_embed.proj.weight"],
          "embeddings.patch_embedding.bias": eva["patch_embed.proj.bias"]}
    for i in range(v.depth):
        b = f"blocks.{i}."
        t = f"encoder.layers.{i}."
        sd[t + "self_attn.qkv.weight"] = eva[b + "attn.qkv.weight"]
        hf_keys = hf.state_dict()
        if t + "self_attn.q_bias" in hf_keys:
            sd[t + "self_attn.q_bias"], sd[t + "self_attn.v_bias"] = eva[b + "attn.q_bias"], eva[b + "attn.v_bias"]
        else:
            sd[t + "self_attn.qkv.bias"] = torch.cat([eva[b + "attn.q_bias"], torch.zeros(v.width), eva[b + "attn.v_bias"]])
        for ours, theirs in [("attn.proj", "self_attn.projection"), ("norm1", "layer_norm1"), ("norm2", "layer_norm2"),
                             ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]:
            for p in ("weight", "bias"):
                sd[f"{t}{theirs}.{p}"] = eva[f"{b}{ours}.{p}"]
    hf.load_state_dict(sd, strict=False)
    px = torch.randn(2, 3, v.image_size, v.image_size)
    with torch.no_grad():
        ours = model.vision(px)
        theirs = hf(pixel_values=px, output_hidden_states=True).hidden_states[-1]   # before post_layernorm
    assert ours.shape == (2, v.num_patches + 1, v.width)
    assert rel_err(ours, theirs) < RTOL


@pytest.mark.parametrize("rope_scaling", [1.0, 16.0])
def test_llm_matches_llama_for_causal_lm(model, rope_scaling):
    from transformers import LlamaConfig, LlamaForCausalLM
    c = model.config.llm
    model.llm.cfg.rope_scaling = rope_scaling
    try:
        hf = LlamaForCausalLM(LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden, intermediate_size=c.ffn, num_hidden_layers=c.layers,
            num_attention_heads=c.heads, num_key_value_heads=c.kv_heads, rms_norm_eps=c.eps,
            max_position_embeddings=c.max_positions, rope_theta=c.rope_theta,
            rope_scaling={"rope_type": "linear", "factor": rope_scaling} if rope_scaling != 1.0 else None,
            tie_word_embeddings=False, attn_implementation="eager")).eval()
        released, _ = released_state_dict(model)
        hf.load_state_dict({k: v for k, v in released.items() if k.startswith(("model.layers", "model.embed",
                                                                               "model.norm", "lm_head"))})
        embeds = torch.randn(1, 40, c.hidden)
        with torch.no_grad():
            ours, _ = model.llm(embeds)
            theirs = hf(inputs_embeds=embeds).logits
            # and with a KV cache: 30 tokens, then 10 more
            first, past = model.llm(embeds[:, :30])
            second, _ = model.llm(embeds[:, 30:], past=past)
            last, _ = model.llm(embeds, last_only=True)                      # what the exported decoders emit
        assert rel_err(ours, theirs) < RTOL
        assert last.shape == (1, 1, c.vocab_size) and rel_err(last, theirs[:, -1:]) < RTOL
        assert rel_err(torch.cat([first, second], 1), theirs) < RTOL
    finally:
        model.llm.cfg.rope_scaling = 1.0
