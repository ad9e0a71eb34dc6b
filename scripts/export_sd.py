"""Export a diffusers Stable Diffusion folder to the files ragar's ort and
tch generators read, next to the weights candle reads (Optimum-style names):

  text_encoder/model.{onnx,ts}  input_ids [n, 77] int64 -> last_hidden_state
                                [n, 77, d] (final LayerNorm applied, no mask)
  unet/model.{onnx,ts}          sample [b, 4, h, w] f32, timestep [b] f32,
                                encoder_hidden_states [b, 77, d] f32
                                -> out_sample [b, 4, h, w]
  vae_decoder/model.{onnx,ts}   latent_sample [b, 4, h, w] f32 (already
                                divided by scaling_factor) -> sample
                                [b, 3, 8h, 8w] in about [-1, 1]
  vae_decoder/config.json       a copy of vae/config.json

ONNX opset 17 with dynamic batch and spatial axes; TorchScript traced,
running on the device its inputs are on. `--dtype f16` (or bf16) writes
half-precision TorchScript modules instead ({text_encoder,unet,vae_decoder}/
model.f16.ts: float inputs and outputs in f16), which the tch backend reads
for `dtype: f16`; ONNX exports stay f32. The
tokenizer, the scheduler loop, guidance and post-processing stay in ragar,
shared by all three backends (ragar_core::diffusion). Each export is checked
against diffusers at shapes other than the traced ones.

Usage: python scripts/export_sd.py PIPELINE_DIR [--dtype f32|f16|bf16]
Real checkpoints work the same way (e.g. after `huggingface-cli download
stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir sd15`); ONNX files
over 2 GB (the SD 1.5 UNet in float32) are written with external data.
"""
import copy
import os
import shutil

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from ragar_export import DTYPES, HALF_LIMIT, cast, command_line, relative, save_onnx, trace, ts_name
from transformers import CLIPTextModel


class Text(torch.nn.Module):
    def __init__(self, te):
        super().__init__()
        self.te = te

    def forward(self, input_ids):
        return self.te(input_ids=input_ids).last_hidden_state


class Unet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class Decoder(torch.nn.Module):
    """AutoencoderKL.decode: the decoder half only (a traced module keeps
    every parameter of the submodules it holds; the encoder is 34 M of SD's)."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder

    def forward(self, latent_sample):
        z = latent_sample if self.post_quant_conv is None else self.post_quant_conv(latent_sample)
        return self.decoder(z)


def export(module, inputs, folder, in_names, out_name, axes, large, dtype, onnx):
    os.makedirs(folder, exist_ok=True)
    if dtype == "f32" and onnx:
        onnx_path = os.path.join(folder, "model.onnx")
        if large:
            # > 2 GB does not fit one protobuf: weights go next to the graph
            # (and the graph is not folded: onnx_shapes works on one protobuf).
            torch.onnx.export(module, inputs, onnx_path, external_data=True, dynamo=False, opset_version=17,
                              input_names=in_names, output_names=[out_name], dynamic_axes=axes)
        else:
            save_onnx(onnx_path, module, inputs, in_names, [out_name], axes)
    # A copy in the export's precision: `module` stays the f32 reference for `check`.
    half = module if dtype == "f32" else copy.deepcopy(module).to(DTYPES[dtype])
    trace(half, cast(inputs, dtype), os.path.join(folder, ts_name("model", dtype)))


def check(folder, module, inputs, names, dtype, onnx):
    """The exports against diffusers / transformers in f32 at other shapes:
    within 1e-4 (f32) or HALF_LIMIT (half) of the largest output."""
    with torch.no_grad():
        want = module(*inputs)
        got_ts = torch.jit.load(os.path.join(folder, ts_name("model", dtype)))(*cast(inputs, dtype)).float()
    d_ts = relative(want, got_ts)
    what = f"{os.path.basename(folder)} {tuple(inputs[0].shape)}"
    if dtype != "f32" or not onnx:
        print(f"{what} {dtype}: max relative |diffusers f32 - torchscript {dtype}| = {d_ts:.2e}")
        assert d_ts < HALF_LIMIT.get(dtype, 1e-4), "export does not reproduce the model"
        return
    import onnxruntime as ort
    sess = ort.InferenceSession(os.path.join(folder, "model.onnx"), providers=["CPUExecutionProvider"])
    got_onnx = torch.from_numpy(sess.run(None, {n: v.numpy() for n, v in zip(names, inputs)})[0])
    d_onnx = relative(want, got_onnx)
    print(f"{what}: max relative |diffusers - torchscript| = {d_ts:.2e}, |diffusers - onnx| = {d_onnx:.2e}")
    assert d_ts < 1e-4 and d_onnx < 1e-4, "export does not reproduce the model"


def main(root, dtype, onnx=True):
    """Export (ONNX too when f32 and `onnx`) and check against diffusers / transformers."""
    torch.manual_seed(0)
    te = CLIPTextModel.from_pretrained(os.path.join(root, "text_encoder"), attn_implementation="eager").eval()
    unet = UNet2DConditionModel.from_pretrained(os.path.join(root, "unet")).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(root, "vae")).eval()
    text, u, dec = Text(te).eval(), Unet(unet).eval(), Decoder(vae).eval()
    large = sum(p.numel() for p in unet.parameters()) * 4 > 2_000_000_000
    length, d = te.config.max_position_embeddings, te.config.hidden_size
    c = unet.config.in_channels
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, te.config.vocab_size, (2, length), generator=g)
    lat = torch.randn(2, c, 8, 8, generator=g)
    t = torch.tensor([500.0, 20.5])
    ctx = torch.randn(2, length, d, generator=g)

    with torch.no_grad():
        z = torch.randn(1, c, 4, 6, generator=g)
        assert torch.equal(dec(z), vae.decode(z, return_dict=False)[0]), "Decoder is not AutoencoderKL.decode"

    vae_dir = os.path.join(root, "vae_decoder")
    export(text, (ids,), os.path.join(root, "text_encoder"), ["input_ids"], "last_hidden_state",
           {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}}, False, dtype, onnx)
    export(u, (lat, t, ctx), os.path.join(root, "unet"), ["sample", "timestep", "encoder_hidden_states"],
           "out_sample", {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
                          "encoder_hidden_states": {0: "batch"},
                          "out_sample": {0: "batch", 2: "height", 3: "width"}}, large, dtype, onnx)
    export(dec, (lat,), vae_dir, ["latent_sample"], "sample",
           {"latent_sample": {0: "batch", 2: "height", 3: "width"},
            "sample": {0: "batch", 2: "height", 3: "width"}}, False, dtype, onnx)
    shutil.copy(os.path.join(root, "vae", "config.json"), os.path.join(vae_dir, "config.json"))

    check(os.path.join(root, "text_encoder"), text,
          (torch.randint(0, te.config.vocab_size, (3, length), generator=g),), ["input_ids"], dtype, onnx)
    check(os.path.join(root, "unet"), u,
          (torch.randn(3, c, 16, 8, generator=g), torch.tensor([999.0, 1.0, 333.3]),
           torch.randn(3, length, d, generator=g)), ["sample", "timestep", "encoder_hidden_states"], dtype, onnx)
    check(vae_dir, dec, (torch.randn(1, c, 4, 12, generator=g),), ["latent_sample"], dtype, onnx)


if __name__ == "__main__":
    (pipeline_dir,), dtype = command_line("python scripts/export_sd.py PIPELINE_DIR [--dtype f32|f16|bf16]")
    main(pipeline_dir, dtype)
