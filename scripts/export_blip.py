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

The decode loops (greedy, beam search), the preprocessing and the tokenizer
stay in ragar (ragar_core::decoding, ragar_core::blip), shared with candle.
BLIP-2 is not exported here. Checked against transformers at other shapes
(the cached decoder: the prefix fed in three pieces against one uncached
pass).

Usage: python scripts/export_blip.py MODEL_DIR
"""
import os
import sys

import torch
from transformers import BlipForConditionalGeneration, DynamicCache, EncoderDecoderCache


class Vision(torch.nn.Module):
    def __init__(self, blip):
        super().__init__()
        self.vision_model = blip.vision_model

    def forward(self, pixel_values):
        return self.vision_model(pixel_values=pixel_values)[0]


class Cross(torch.nn.Module):
    """Each decoder layer's cross-attention keys and values of the image."""

    def __init__(self, blip):
        super().__init__()
        self.layers = blip.text_decoder.bert.encoder.layer

    def forward(self, image_embeds):
        out = []
        for layer in self.layers:
            att = layer.crossattention.self
            shape = (*image_embeds.shape[:-1], -1, att.attention_head_size)
            out += [att.key(image_embeds).view(shape).transpose(1, 2),
                    att.value(image_embeds).view(shape).transpose(1, 2)]
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
        self_cache, cross_cache = DynamicCache(config=cfg), DynamicCache(config=cfg)
        for i in range(self.n):
            self_cache.update(past[2 * i], past[2 * i + 1], i)
            cross_cache.update(cross[2 * i], cross[2 * i + 1], i)
        # Only the shape of encoder_hidden_states is read once the cross
        # keys and values are cached: a [b, n, 1] stand-in.
        stand_in = cross[0].new_zeros(cross[0].shape[0], cross[0].shape[2], 1)
        out = self.text_decoder(input_ids=input_ids, encoder_hidden_states=stand_in,
                                cache=EncoderDecoderCache(self_cache, cross_cache), use_cache=True, return_dict=True)
        present = []
        for layer in out.cache.self_attention_cache.layers[:self.n]:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def save(path, write):
    write(path + ".part")
    os.replace(path + ".part", path)


def main(root):
    torch.manual_seed(0)
    blip = BlipForConditionalGeneration.from_pretrained(root, attn_implementation="eager").eval()
    size = blip.config.vision_config.image_size
    vocab = blip.config.text_config.vocab_size
    vision, cross, decoder = Vision(blip).eval(), Cross(blip).eval(), Decoder(blip).eval()
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
    for name, module, inputs, names, outs, axes in [
        ("vision_model", vision, (px,), ["pixel_values"], ["image_embeds"],
         {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}),
        ("text_decoder_cross", cross, (emb,), ["image_embeds"], [f"cross.{k}" for k in kv],
         {"image_embeds": {0: "batch", 1: "image_tokens"},
          **{f"cross.{k}": {0: "batch", 2: "image_tokens"} for k in kv}}),
        ("text_decoder_with_past", decoder, (ids, *past, *ck), dec_names, ["logits"] + [f"present.{k}" for k in kv],
         dec_axes),
    ]:
        path = os.path.join(root, name)
        save(path + ".onnx", lambda p: torch.onnx.export(
            module, inputs, p, dynamo=False, opset_version=17, input_names=names, output_names=outs,
            dynamic_axes=axes))
        with torch.no_grad():
            traced = torch.jit.trace(module, inputs, check_trace=False)
        save(path + ".ts", traced.save)

    # Check: 3 images, a 9-token prefix fed as 4 + 3 + 2 tokens through each
    # export's cache, against transformers' uncached decoder.
    import onnxruntime as ort
    px3 = torch.randn(3, 3, size, size, generator=g)
    ids3 = torch.randint(0, vocab, (3, 9), generator=g)
    with torch.no_grad():
        want_emb = vision(px3)
        want = blip.text_decoder(input_ids=ids3, encoder_hidden_states=want_emb, return_dict=True).logits
    sessions = {m: ort.InferenceSession(os.path.join(root, m + ".onnx"), providers=["CPUExecutionProvider"])
                for m in ("vision_model", "text_decoder_cross", "text_decoder_with_past")}
    modules = {m: torch.jit.load(os.path.join(root, m + ".ts"))
               for m in ("vision_model", "text_decoder_cross", "text_decoder_with_past")}

    def onnx(m, *x):
        names = [i.name for i in sessions[m].get_inputs()]
        return [torch.from_numpy(o) for o in sessions[m].run(None, {k: v.numpy() for k, v in zip(names, x)})]

    def ts(m, *x):
        with torch.no_grad():
            o = modules[m](*x)
        return list(o) if isinstance(o, tuple) else [o]

    for label, run in [("torchscript", ts), ("onnx", onnx)]:
        got_emb = run("vision_model", px3)[0]
        c = run("text_decoder_cross", got_emb)
        past = [torch.zeros(3, heads, 0, hd) for _ in range(2 * n)]
        pieces = []
        for a, b in [(0, 4), (4, 7), (7, 9)]:
            out = run("text_decoder_with_past", ids3[:, a:b], *past, *c)
            pieces.append(out[0])
            past = out[1:]
        got = torch.cat(pieces, dim=1)
        d_emb = (want_emb - got_emb).abs().max().item() / (want_emb.abs().max().item() + 1e-12)
        d = (want - got).abs().max().item() / (want.abs().max().item() + 1e-12)
        print(f"{label}: max relative |transformers - export| image_embeds {d_emb:.2e}, cached logits {d:.2e}")
        assert d_emb < 1e-5 and d < 1e-5, "export does not reproduce the model"


if __name__ == "__main__":
    main(sys.argv[1])
