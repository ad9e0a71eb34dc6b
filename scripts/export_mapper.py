"""Export a trained Mapper checkpoint (what `ragar train` writes:
mapper.safetensors with its `mapper_config` metadata) to the graphs ragar's
ort and tch Mappers read for inference, next to the checkpoint:

  <stem>.onnx / <stem>.ts   x [b, 1 + n_img_tokens, input_dim] f32 (the
                            text-related embedding, then the [IMG] states),
                            kw [b, keyword_dim] f32
                            -> mapped, preference [b, n_queries, output_dim]

The model is scripts/ragar_mapper.py, the PyTorch transcription that
candle's Mapper is parity-tested against; training stays on candle
(autograd and the optimiser state live there). Checked against the eager
model at another batch size.

`--dtype f16` (or bf16) writes the half-precision TorchScript module alone
(<stem>.f16.ts: x, kw and both outputs in f16), which the tch Mapper reads
for `mapper.dtype: f16`; checked against the f32 eager model.

Usage: python scripts/export_mapper.py CHECKPOINT.safetensors [--dtype f32|f16|bf16]
"""
import copy
import json
import os
import sys

import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ragar_export import DTYPES, HALF_LIMIT, cast, command_line, relative, save_onnx, trace, ts_name  # noqa: E402
from ragar_mapper import Mapper  # noqa: E402


def main(ckpt, dtype):
    with safe_open(ckpt, "pt") as f:
        meta = json.loads((f.metadata() or {}).get("ragar.mapper", "{}"))
        if "mapper_config" not in meta:
            sys.exit(f"{ckpt}: no ragar.mapper metadata with mapper_config (not a `ragar train` checkpoint)")
        weights = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("optimizer.")}
    c = meta["mapper_config"]
    m = Mapper(c).eval()
    missing, unexpected = m.load_state_dict(weights, strict=False)
    if missing or unexpected:
        sys.exit(f"{ckpt}: missing {missing}, unexpected {unexpected}")
    g = torch.Generator().manual_seed(0)
    example = (torch.randn(2, 1 + c["n_img_tokens"], c["input_dim"], generator=g),
               torch.randn(2, c["keyword_dim"], generator=g))
    stem = os.path.splitext(ckpt)[0]
    # The fast path of nn.MultiheadAttention (eval, no grad) is not what the
    # exporters should see: export the plain math.
    torch.backends.mha.set_fastpath_enabled(False)
    x = (torch.randn(3, 1 + c["n_img_tokens"], c["input_dim"], generator=g),
         torch.randn(3, c["keyword_dim"], generator=g))
    with torch.no_grad():
        want = m(*x)
    if dtype != "f32":
        # A half copy traced (`m` stays the f32 reference); no ONNX.
        path = ts_name(stem, dtype)
        trace(copy.deepcopy(m).to(DTYPES[dtype]), cast(example, dtype), path)
        with torch.no_grad():
            got = torch.jit.load(path)(*cast(x, dtype))
        for i, name in enumerate(["mapped", "preference"]):
            d = relative(want[i], got[i].float())
            print(f"{name} (batch 3): max |torch f32 - torchscript {dtype}| / max |torch| = {d:.2e}")
            assert d < HALF_LIMIT[dtype], "export does not reproduce the model"
        print("wrote", path)
        return
    axes = {n: {0: "batch"} for n in ["x", "kw", "mapped", "preference"]}
    save_onnx(stem + ".onnx", m, example, ["x", "kw"], ["mapped", "preference"], axes)
    trace(m, example, stem + ".ts")

    import onnxruntime as ort
    with torch.no_grad():
        got_ts = torch.jit.load(stem + ".ts")(*x)
    got_onnx = ort.InferenceSession(stem + ".onnx", providers=["CPUExecutionProvider"]).run(
        None, {"x": x[0].numpy(), "kw": x[1].numpy()})
    for i, name in enumerate(["mapped", "preference"]):
        d_ts = (want[i] - got_ts[i]).abs().max().item()
        d_onnx = abs(want[i].numpy() - got_onnx[i]).max()
        print(f"{name} (batch 3): max |torch - torchscript| = {d_ts:.2e}, max |torch - onnx| = {d_onnx:.2e}")
        assert d_ts < 1e-4 and d_onnx < 1e-4, "export does not reproduce the model"
    print("wrote", stem + ".onnx", stem + ".ts")


if __name__ == "__main__":
    (ckpt,), dtype = command_line("python scripts/export_mapper.py CHECKPOINT.safetensors [--dtype f32|f16|bf16]")
    main(ckpt, dtype)
