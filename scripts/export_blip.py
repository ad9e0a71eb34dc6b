"""Export an HF BLIP captioning folder (BlipForConditionalGeneration) to
the graphs ragar's ort and tch captioners read, next to its weights:

  vision_model.{onnx,ts}  pixel_values [b, 3, s, s] f32 (the processor's)
                          -> image_embeds [b, n, d]
  text_decoder.{onnx,ts}  input_ids [b, t] int64, image_embeds [b, n, d]
                          -> logits [b, t, vocab] (causal, no cache: ragar
                          re-runs the prefix each step)

The decode loops (greedy, beam search), the preprocessing and the tokenizer
stay in ragar (ragar_core::decoding, ragar_core::blip), shared with candle.
BLIP-2 is not exported (its OPT decoder wants a key/value cache to be
practical). Checked against transformers at other shapes.

Usage: python scripts/export_blip.py MODEL_DIR
"""
import os
import sys

import torch
from transformers import BlipForConditionalGeneration


class Vision(torch.nn.Module):
    def __init__(self, blip):
        super().__init__()
        self.vision_model = blip.vision_model

    def forward(self, pixel_values):
        return self.vision_model(pixel_values=pixel_values)[0]


class Decoder(torch.nn.Module):
    def __init__(self, blip):
        super().__init__()
        self.text_decoder = blip.text_decoder

    def forward(self, input_ids, image_embeds):
        return self.text_decoder(input_ids=input_ids, encoder_hidden_states=image_embeds, return_dict=False)[0]


def save(path, write):
    write(path + ".part")
    os.replace(path + ".part", path)


def main(root):
    torch.manual_seed(0)
    blip = BlipForConditionalGeneration.from_pretrained(root, attn_implementation="eager").eval()
    size = blip.config.vision_config.image_size
    vocab = blip.config.text_config.vocab_size
    vision, decoder = Vision(blip).eval(), Decoder(blip).eval()
    g = torch.Generator().manual_seed(1)
    px = torch.randn(2, 3, size, size, generator=g)
    with torch.no_grad():
        emb = vision(px)
    ids = torch.randint(0, vocab, (2, 5), generator=g)
    for name, module, inputs, names, out, axes in [
        ("vision_model", vision, (px,), ["pixel_values"], "image_embeds",
         {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}),
        ("text_decoder", decoder, (ids, emb), ["input_ids", "image_embeds"], "logits",
         {"input_ids": {0: "batch", 1: "sequence"}, "image_embeds": {0: "batch"},
          "logits": {0: "batch", 1: "sequence"}}),
    ]:
        path = os.path.join(root, name)
        save(path + ".onnx", lambda p: torch.onnx.export(
            module, inputs, p, dynamo=False, opset_version=17, input_names=names, output_names=[out],
            dynamic_axes=axes))
        with torch.no_grad():
            traced = torch.jit.trace(module, inputs, check_trace=False)
        save(path + ".ts", traced.save)

    import onnxruntime as ort
    px3 = torch.randn(3, 3, size, size, generator=g)
    with torch.no_grad():
        emb3 = vision(px3)
    ids3 = torch.randint(0, vocab, (3, 9), generator=g)
    for name, module, x, names in [("vision_model", vision, (px3,), ["pixel_values"]),
                                   ("text_decoder", decoder, (ids3, emb3), ["input_ids", "image_embeds"])]:
        path = os.path.join(root, name)
        with torch.no_grad():
            want = module(*x)
            got_ts = torch.jit.load(path + ".ts")(*x)
        got_onnx = ort.InferenceSession(path + ".onnx", providers=["CPUExecutionProvider"]).run(
            None, {n: v.numpy() for n, v in zip(names, x)})[0]
        scale = want.abs().max().item() + 1e-12
        d_ts = (want - got_ts).abs().max().item() / scale
        d_onnx = abs(want.numpy() - got_onnx).max() / scale
        print(f"{name} {tuple(x[0].shape)}: max relative |transformers - torchscript| = {d_ts:.2e}, "
              f"|transformers - onnx| = {d_onnx:.2e}")
        assert d_ts < 1e-5 and d_onnx < 1e-5, "export does not reproduce the model"


if __name__ == "__main__":
    main(sys.argv[1])
