"""Export an HF BLIP captioning folder (BlipForConditionalGeneration) to
the graphs ragar's ort and tch captioners read, next to its weights:

  vision_model.{onnx,ts}   pixel_values [b, 3, s, s] f32 (the processor's)
                           -> image_embeds [b, n, d]
  text_decoder_cross.{onnx,ts}
                           image_embeds [b, n, d] -> cross.{i}.{key,value}
                           [b, heads, n, head_dim]: each decoder layer's
                           cross-attention keys and values, made once per
                           image (transformers caches them the same way)
  text_decoder_with_past.{onnx,ts}
                           input_ids [b, t] int64,
                           past_key_values.{i}.{key,value} [b, heads, p, head_dim]
                           (self-attention; p = 0 at the start), then
                           cross.{i}.{key,value}
                           -> logits [b, t, vocab], present.{i}.{key,value}
                           [b, heads, p + t, head_dim]

A BLIP-2 folder (Blip2ForConditionalGeneration with an OPT language
model) gets instead:

  image_queries.{onnx,ts}  pixel_values [b, 3, s, s] -> the projected
                           Q-Former queries [b, q, d] (the language model's
                           input embeddings for the image)
  embed_tokens.{onnx,ts}   input_ids [b, t] int64 -> inputs_embeds [b, t, d]
  language_model_with_past.{onnx,ts}
                           inputs_embeds [b, t, d], attention_mask [b, p + t]
                           int64, past_key_values.{i}.{key,value}
                           -> logits [b, t, vocab], present.{i}.{key,value}

The decode loops (greedy, beam search), the preprocessing and the tokenizer
stay in ragar (ragar_core::decoding, ragar_core::blip), shared with candle.
Checked against transformers at other shapes (the cached decoders: the
prefix fed in three pieces against one uncached pass).

The TorchScript vision towers run attention as one fused
aten::scaled_dot_product_attention (libtorch's flash kernels on the CPU and
CUDA); the ONNX graphs keep transformers' separate ops.

`--dtype f16` (or bf16) writes half-precision TorchScript modules instead
(*.f16.ts: float inputs, caches and outputs in f16), which the tch backend
reads for `dtype: f16`; ONNX exports stay f32.

Usage: python scripts/export_blip.py MODEL_DIR [--dtype f32|f16|bf16]
"""
import os
import sys

import torch
from transformers import BlipForConditionalGeneration, EncoderDecoderCache

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ragar_export import (HALF_LIMIT, cache_of, cache_out, command_line, export, flat_of, relative,  # noqa: E402
                          runners, with_cache)


class Vision(torch.nn.Module):
    def __init__(self, vision_model):
        super().__init__()
        self.vision_model = vision_model

    def forward(self, pixel_values):
        return self.vision_model(pixel_values=pixel_values)[0]


class FusedAttention(torch.nn.Module):
    """BlipAttention (softmax(Q K^T * scale) V, which transformers only has
    as separate ops) as one aten::scaled_dot_product_attention, for the
    TorchScript export: libtorch's fused kernels (flash attention on the CPU
    and on CUDA) never write the [heads, n, n] scores out. BLIP-base's 577
    image tokens at batch 8: 60 ms per layer here instead of 178. The ONNX
    graph keeps transformers' ops (every runtime has them)."""

    def __init__(self, att):
        super().__init__()
        self.qkv, self.projection = att.qkv, att.projection
        self.heads, self.scale = att.num_heads, att.scale

    def forward(self, hidden_states, **kwargs):
        b, n, d = hidden_states.shape
        q, k, v = self.qkv(hidden_states).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.projection(out.transpose(1, 2).reshape(b, n, d)), None


def fused_vision(vision_model):
    """A copy of BLIP's vision model whose attention layers are FusedAttention."""
    import copy
    fused = copy.deepcopy(vision_model)
    for layer in fused.encoder.layers:
        layer.self_attn = FusedAttention(layer.self_attn)
    return fused.eval()


class Cross(torch.nn.Module):
    """Each decoder layer's cross-attention keys and values of the image."""

    def __init__(self, blip):
        super().__init__()
        # Only the key / value projections: a traced module keeps every
        # parameter of the submodules it holds, and the whole decoder would
        # make this file 8x larger (454 MB for BLIP-base).
        cross = [layer.crossattention.self for layer in blip.text_decoder.bert.encoder.layer]
        self.keys = torch.nn.ModuleList(att.key for att in cross)
        self.values = torch.nn.ModuleList(att.value for att in cross)
        self.head_size = cross[0].attention_head_size

    def forward(self, image_embeds):
        out = []
        shape = (*image_embeds.shape[:-1], -1, self.head_size)
        for key, value in zip(self.keys, self.values):
            out += [key(image_embeds).view(shape).transpose(1, 2), value(image_embeds).view(shape).transpose(1, 2)]
        return tuple(out)


class Decoder(torch.nn.Module):
    """New tokens on top of the self-attention cache, with the image's
    cross-attention keys and values already made (transformers'
    EncoderDecoderCache with its cross half filled)."""

    def __init__(self, blip):
        super().__init__()
        self.text_decoder = blip.text_decoder
        self.n = len(blip.text_decoder.bert.encoder.layer)

    def forward(self, input_ids, *kv):
        past, cross = kv[:2 * self.n], kv[2 * self.n:]
        cfg = self.text_decoder.config
        self_cache, cross_cache = cache_of(past, self.n, cfg), cache_of(cross, self.n, cfg)
        # Only the shape of encoder_hidden_states is read once the cross
        # keys and values are cached: a [b, n, 1] stand-in.
        stand_in = cross[0].new_zeros(cross[0].shape[0], cross[0].shape[2], 1)
        out = self.text_decoder(input_ids=input_ids, encoder_hidden_states=stand_in, use_cache=True,
                                return_dict=True,
                                **with_cache(self.text_decoder.forward, EncoderDecoderCache(self_cache, cross_cache)))
        return (out.logits, *flat_of(cache_out(out).self_attention_cache, self.n))


class Queries(torch.nn.Module):
    """BLIP-2: pixels -> vision model -> Q-Former -> language projection."""

    def __init__(self, blip2, vision_model=None):
        super().__init__()
        # Not the language model: a traced module keeps every parameter of
        # the submodules it holds (OPT-2.7B's 10 GB in this file).
        self.vision_model = blip2.vision_model if vision_model is None else vision_model
        self.query_tokens = blip2.query_tokens
        self.qformer = blip2.qformer
        self.language_projection = blip2.language_projection

    def forward(self, pixel_values):
        image = self.vision_model(pixel_values=pixel_values).last_hidden_state
        queries = self.query_tokens.expand(image.shape[0], -1, -1)
        mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=mask,
                           return_dict=True).last_hidden_state
        return self.language_projection(out)


def sdpa_vision(vision_model):
    """A copy of BLIP-2's vision model on transformers' sdpa attention (one
    aten::scaled_dot_product_attention per layer, as FusedAttention above),
    for the TorchScript export; the model itself stays eager for the ONNX
    graph and as the reference."""
    import copy
    fused = copy.deepcopy(vision_model)
    fused.config._attn_implementation = "sdpa"
    return fused.eval()


class Embed(torch.nn.Module):
    def __init__(self, blip2):
        super().__init__()
        self.embed = blip2.get_input_embeddings()

    def forward(self, input_ids):
        return self.embed(input_ids)


class LanguageModel(torch.nn.Module):
    """BLIP-2's OPT on its key/value cache, from input embeddings."""

    def __init__(self, blip2):
        super().__init__()
        self.lm = blip2.language_model
        self.n = blip2.config.text_config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, *past):
        out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=True, return_dict=True,
                      **with_cache(self.lm.forward, cache_of(past, self.n, self.lm.config)))
        return (out.logits, *flat_of(cache_out(out), self.n))


def main_blip2(root, dtype):
    from transformers import Blip2ForConditionalGeneration
    torch.manual_seed(0)
    blip2 = Blip2ForConditionalGeneration.from_pretrained(root, attn_implementation="eager").eval()
    tc = blip2.config.text_config
    size = blip2.config.vision_config.image_size
    heads = tc.num_attention_heads
    hd = tc.hidden_size // heads
    n = tc.num_hidden_layers
    kv = [f"{i}.{k}" for i in range(n) for k in ("key", "value")]
    queries, embed, lm = Queries(blip2).eval(), Embed(blip2).eval(), LanguageModel(blip2).eval()
    g = torch.Generator().manual_seed(1)
    px = torch.randn(2, 3, size, size, generator=g)
    ids = torch.randint(0, tc.vocab_size, (2, 3), generator=g)
    emb = torch.randn(2, 3, tc.word_embed_proj_dim, generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    past = [torch.randn(2, heads, 4, hd, generator=g) for _ in range(2 * n)]
    lm_axes = {"inputs_embeds": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
               "logits": {0: "batch", 1: "sequence"}}
    lm_axes.update({f"past_key_values.{k}": {0: "batch", 2: "past_sequence"} for k in kv})
    lm_axes.update({f"present.{k}": {0: "batch", 2: "total_sequence"} for k in kv})
    export(root, "image_queries", queries, (px,), ["pixel_values"], ["image_queries"],
           {"pixel_values": {0: "batch"}, "image_queries": {0: "batch"}}, dtype,
           traced=Queries(blip2, sdpa_vision(blip2.vision_model)).eval())
    export(root, "embed_tokens", embed, (ids,), ["input_ids"], ["inputs_embeds"],
           {"input_ids": {0: "batch", 1: "sequence"}, "inputs_embeds": {0: "batch", 1: "sequence"}}, dtype)
    export(root, "language_model_with_past", lm, (emb, mask, *past),
           ["inputs_embeds", "attention_mask"] + [f"past_key_values.{k}" for k in kv],
           ["logits"] + [f"present.{k}" for k in kv], lm_axes, dtype)

    # Check: 3 images' queries + 6 text tokens, fed as 8 + 4 + 2 positions
    # through each export's cache, against one uncached transformers pass.
    px3 = torch.randn(3, 3, size, size, generator=g)
    ids3 = torch.randint(0, tc.vocab_size, (3, 6), generator=g)
    with torch.no_grad():
        want_q = queries(px3)
        x = torch.cat([want_q, blip2.get_input_embeddings()(ids3)], dim=1)
        want = blip2.language_model(inputs_embeds=x, return_dict=True).logits
    total = x.shape[1]
    limit = 1e-5 if dtype == "f32" else HALF_LIMIT[dtype]
    for label, run in runners(root, ["image_queries", "embed_tokens", "language_model_with_past"], dtype):
        got_q = run("image_queries", px3)[0]
        x = torch.cat([got_q, run("embed_tokens", ids3)[0]], dim=1)
        past = [torch.zeros(3, heads, 0, hd) for _ in range(2 * n)]
        pieces = []
        for a, b in [(0, total - 6), (total - 6, total - 2), (total - 2, total)]:
            out = run("language_model_with_past", x[:, a:b], torch.ones(3, b, dtype=torch.long), *past)
            pieces.append(out[0])
            past = out[1:]
        d_q, d = relative(want_q, got_q), relative(want, torch.cat(pieces, dim=1))
        print(f"{label}: max relative |transformers - export| image queries {d_q:.2e}, cached logits {d:.2e}")
        assert d_q < limit and d < limit, "export does not reproduce the model"


def main(root, dtype):
    import json
    with open(os.path.join(root, "config.json")) as f:
        if json.load(f).get("model_type") == "blip-2":
            return main_blip2(root, dtype)
    torch.manual_seed(0)
    blip = BlipForConditionalGeneration.from_pretrained(root, attn_implementation="eager").eval()
    size = blip.config.vision_config.image_size
    vocab = blip.config.text_config.vocab_size
    vision, cross, decoder = Vision(blip.vision_model).eval(), Cross(blip).eval(), Decoder(blip).eval()
    n = decoder.n
    kv = [f"{i}.{k}" for i in range(n) for k in ("key", "value")]
    g = torch.Generator().manual_seed(1)
    px = torch.randn(2, 3, size, size, generator=g)
    with torch.no_grad():
        emb = vision(px)
        ck = cross(emb)
    heads, hd = ck[0].shape[1], ck[0].shape[3]
    ids = torch.randint(0, vocab, (2, 2), generator=g)
    past = [torch.randn(2, heads, 3, hd, generator=g) for _ in range(2 * n)]
    dec_names = ["input_ids"] + [f"past_key_values.{k}" for k in kv] + [f"cross.{k}" for k in kv]
    dec_axes = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    dec_axes.update({f"past_key_values.{k}": {0: "batch", 2: "past_sequence"} for k in kv})
    dec_axes.update({f"cross.{k}": {0: "batch", 2: "image_tokens"} for k in kv})
    dec_axes.update({f"present.{k}": {0: "batch", 2: "total_sequence"} for k in kv})
    export(root, "vision_model", vision, (px,), ["pixel_values"], ["image_embeds"],
           {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}, dtype,
           traced=Vision(fused_vision(blip.vision_model)).eval())
    export(root, "text_decoder_cross", cross, (emb,), ["image_embeds"], [f"cross.{k}" for k in kv],
           {"image_embeds": {0: "batch", 1: "image_tokens"},
            **{f"cross.{k}": {0: "batch", 2: "image_tokens"} for k in kv}}, dtype)
    export(root, "text_decoder_with_past", decoder, (ids, *past, *ck), dec_names,
           ["logits"] + [f"present.{k}" for k in kv], dec_axes, dtype)

    # Check: 3 images, a 9-token prefix fed as 4 + 3 + 2 tokens through each
    # export's cache, against transformers' uncached decoder.
    px3 = torch.randn(3, 3, size, size, generator=g)
    ids3 = torch.randint(0, vocab, (3, 9), generator=g)
    with torch.no_grad():
        want_emb = vision(px3)
        want = blip.text_decoder(input_ids=ids3, encoder_hidden_states=want_emb, return_dict=True).logits
    limit = 1e-5 if dtype == "f32" else HALF_LIMIT[dtype]
    for label, run in runners(root, ["vision_model", "text_decoder_cross", "text_decoder_with_past"], dtype):
        got_emb = run("vision_model", px3)[0]
        c = run("text_decoder_cross", got_emb)
        past = [torch.zeros(3, heads, 0, hd) for _ in range(2 * n)]
        pieces = []
        for a, b in [(0, 4), (4, 7), (7, 9)]:
            out = run("text_decoder_with_past", ids3[:, a:b], *past, *c)
            pieces.append(out[0])
            past = out[1:]
        d_emb, d = relative(want_emb, got_emb), relative(want, torch.cat(pieces, dim=1))
        print(f"{label}: max relative |transformers - export| image_embeds {d_emb:.2e}, cached logits {d:.2e}")
        assert d_emb < limit and d < limit, "export does not reproduce the model"


if __name__ == "__main__":
    (model_dir,), dtype = command_line("python scripts/export_blip.py MODEL_DIR [--dtype f32|f16|bf16]")
    main(model_dir, dtype)
