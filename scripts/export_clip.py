"""Export an HF CLIPModel folder to the files ragar's ort and tch CLIP
encoders read, next to the weights candle reads (model.safetensors):

  text_model.onnx / text_model.ts
      input_ids, attention_mask [batch, seq] int64 -> text_embeds
      [batch, projection_dim] f32 (projected, not normalised)
  vision_model.onnx / vision_model.ts
      pixel_values [batch, 3, size, size] f32 (CLIP-normalised) ->
      image_embeds [batch, projection_dim] f32 (projected, not normalised)

ONNX opset 17 with dynamic batch (and sequence) axes; TorchScript traced,
running on the device its inputs are on. `--dtype f16` (or bf16) writes
half-precision TorchScript modules instead (text_model.f16.ts,
vision_model.f16.ts: pixel_values and the features in f16), which the tch
backend reads for `dtype: f16`; ONNX exports stay f32.
Tokenisation, image preprocessing and L2 normalisation stay in ragar, shared
by all three backends. config.json, tokenizer.json and (optionally)
preprocessor_config.json stay in the folder: ragar reads the projection
size, the image size, the token limit and mean/std from them.

Usage: python scripts/export_clip.py MODEL_DIR [--dtype f32|f16|bf16]
Real checkpoints work the same way, e.g. after
`huggingface-cli download openai/clip-vit-base-patch32 --local-dir clip-b32`:
  python scripts/export_clip.py clip-b32
"""
import json
import os

import torch
from ragar_export import DTYPES, HALF_LIMIT, cast, command_line, relative, save_onnx, trace, ts_name
from transformers import CLIPModel


class Text(torch.nn.Module):
    """CLIPModel.get_text_features, holding only the text tower's weights."""

    def __init__(self, clip):
        super().__init__()
        self.text_model, self.text_projection = clip.text_model, clip.text_projection

    def forward(self, input_ids, attention_mask):
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return self.text_projection(pooled)


class Vision(torch.nn.Module):
    """CLIPModel.get_image_features, holding only the vision tower's weights."""

    def __init__(self, clip):
        super().__init__()
        self.vision_model, self.visual_projection = clip.vision_model, clip.visual_projection

    def forward(self, pixel_values):
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)


def reference(clip, kind, *x):
    """What transformers itself returns, to check the wrappers against."""
    with torch.no_grad():
        out = (clip.get_text_features(input_ids=x[0], attention_mask=x[1]) if kind == "text_model"
               else clip.get_image_features(pixel_values=x[0]))
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def text_example(batch, seq, eos, vocab):
    g = torch.Generator().manual_seed(batch * 100 + seq)
    ids = torch.randint(1, min(vocab, 40000) - 1, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    ids[:, -1] = eos
    if batch > 1:  # a padded row, as in real batches: EOS, then padding
        cut = max(2, seq // 2)
        ids[0, cut - 1] = eos
        ids[0, cut:] = eos
        mask[0, cut:] = 0
    return ids, mask


def main(model_dir, dtype, onnx=True):
    """Export (ONNX too when f32 and `onnx`) and check against transformers."""
    torch.manual_seed(0)
    clip = CLIPModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    eos = clip.config.text_config.eos_token_id
    vocab = clip.config.text_config.vocab_size
    size = clip.config.vision_config.image_size
    # The TorchScript copy, in the export's precision, with PyTorch's fused
    # attention (aten::scaled_dot_product_attention: flash / memory-efficient
    # kernels on CUDA, as transformers uses by default). The ONNX graphs come
    # from `clip` itself, the f32 eager reference: plain softmax(QK^T)V ops
    # every runtime has.
    ts_model = CLIPModel.from_pretrained(model_dir, attn_implementation="sdpa").eval().to(DTYPES[dtype])
    ts_towers = Text(ts_model).eval(), Vision(ts_model).eval()
    onnx_towers = (Text(clip).eval(), Vision(clip).eval()) if dtype == "f32" and onnx else None
    t_in = text_example(2, 12, eos, vocab)
    v_in = (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5)),)

    for i, name, inputs, in_names, out_name, axes in [
        (0, "text_model", t_in, ["input_ids", "attention_mask"], "text_embeds",
         {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
          "text_embeds": {0: "batch"}}),
        (1, "vision_model", v_in, ["pixel_values"], "image_embeds",
         {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}),
    ]:
        if onnx_towers:
            save_onnx(os.path.join(model_dir, name + ".onnx"), onnx_towers[i], inputs, in_names, [out_name], axes)
        trace(ts_towers[i], cast(inputs, dtype), os.path.join(model_dir, ts_name(name, dtype)))

    # Both exports must generalise to other batch sizes and lengths: against
    # transformers in f32, within 1e-4 (f32) or HALF_LIMIT of the largest feature (half).
    import onnxruntime as ort
    checks = [("text_model", text_example(1, 5, eos, vocab), ["input_ids", "attention_mask"]),
              ("text_model", text_example(3, 30, eos, vocab), ["input_ids", "attention_mask"]),
              ("vision_model", (torch.randn(3, 3, size, size),), ["pixel_values"])]
    for name, x, names in checks:
        want = reference(clip, name, *x)
        with torch.no_grad():
            got_ts = torch.jit.load(os.path.join(model_dir, ts_name(name, dtype)))(*cast(x, dtype)).float()
        if not onnx_towers:
            d_ts = relative(want, got_ts)
            print(f"{name} {tuple(x[0].shape)} {dtype}: max |torch f32 - torchscript {dtype}| / max |torch| = {d_ts:.2e}")
            assert d_ts < HALF_LIMIT.get(dtype, 1e-4), "export does not reproduce the model"
            continue
        sess = ort.InferenceSession(os.path.join(model_dir, name + ".onnx"), providers=["CPUExecutionProvider"])
        got_onnx = sess.run(None, {n: v.numpy() for n, v in zip(names, x)})[0]
        d_ts = (want - got_ts).abs().max().item()
        d_onnx = abs(want.numpy() - got_onnx).max()
        print(f"{name} {tuple(x[0].shape)}: max |torch - torchscript| = {d_ts:.2e}, "
              f"max |torch - onnx| = {d_onnx:.2e}")
        assert d_ts < 1e-4 and d_onnx < 1e-4, "export does not reproduce the model"
    print("projection_dim", cfg.get("projection_dim"), "image_size", size)


if __name__ == "__main__":
    (model_dir,), dtype = command_line("python scripts/export_clip.py MODEL_DIR [--dtype f32|f16|bf16]")
    main(model_dir, dtype)
