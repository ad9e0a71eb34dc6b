"""Export a trained content ranker (`ragar train-ranker` with
`ranker.name=content`: a safetensors state with `ragar.content` metadata) to
the scoring graph ragar's ort and tch rankers read, next to the state:

  <stem>.onnx / <stem>.ts
      hist_visual [b, L, dv], hist_text [b, L, dt], mask [b, L] (1 = item,
      0 = left padding; most recent item last), cand_visual [b, C, dv],
      cand_text [b, C, dt] -> scores [b, C]
  (ONNX leaves out the inputs of a modality the model does not have.)

The model is the one plugins/candle/src/content_ranker.rs defines: items
x = W_v v + W_t t; the user the attention-pooled history with a recency
embedding (row 0 = most recent); score = p . x. Training stays on candle.
Checked against the eager module at another batch and candidate count.

`--dtype f16` (or bf16) writes the half-precision TorchScript module alone
(<stem>.f16.ts: every input and the scores in f16), which the tch ranker
reads for `ranker.dtype: f16`; checked against the f32 eager module.

Usage: python scripts/export_content_ranker.py STATE.safetensors [--dtype f32|f16|bf16]
"""
import copy
import json
import os
import sys

import torch
from safetensors import safe_open
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ragar_export import DTYPES, HALF_LIMIT, cast, command_line, relative, save_onnx, trace, ts_name  # noqa: E402


class Content(nn.Module):
    def __init__(self, w, dv, dt, masked=1e9):
        super().__init__()
        # `masked`: how far below the others a padded slot's logit goes (as
        # candle's 1e9 in f32; f16 overflows at 65504, and 0 * inf is NaN).
        self.dv, self.dt, self.masked = dv, dt, masked
        self.visual = nn.Parameter(w["visual.weight"]) if dv else None
        self.text = nn.Parameter(w["text.weight"]) if dt else None
        self.recency = nn.Parameter(w["recency"])
        self.att_w = nn.Parameter(w["attention.weight"])
        self.att_q = nn.Parameter(w["attention.query"])

    def embed(self, v, t):
        x = 0
        if self.dv:
            x = v @ self.visual.T
        if self.dt:
            x = x + t @ self.text.T
        return x

    def forward(self, hist_visual, hist_text, mask, cand_visual, cand_text):
        x = self.embed(hist_visual, hist_text)
        length = x.shape[1]
        h = x + self.recency[:length].flip(0)[None]
        a = torch.tanh(h @ self.att_w.T)
        logits = (a @ self.att_q.T).squeeze(2) + (mask - 1.0) * self.masked
        w = torch.softmax(logits, dim=-1)
        p = (w.unsqueeze(1) @ x).squeeze(1)
        c = self.embed(cand_visual, cand_text)
        return (c * p.unsqueeze(1)).sum(-1)


def main(state, dtype):
    with safe_open(state, "pt") as f:
        meta = json.loads((f.metadata() or {}).get("ragar.content", "{}"))
        if "params" not in meta:
            sys.exit(f"{state}: no ragar.content metadata (not a content-ranker state)")
        w = {k: f.get_tensor(k) for k in f.keys()}
    dv, dt = w["features.visual"].shape[1], w["features.text"].shape[1]
    length = meta["params"]["max_len"]
    m = Content(w, dv, dt).eval()
    g = torch.Generator().manual_seed(0)

    def example(b, c):
        mask = torch.ones(b, length)
        mask[0, : length // 2] = 0
        return (torch.randn(b, length, dv, generator=g), torch.randn(b, length, dt, generator=g), mask,
                torch.randn(b, c, dv, generator=g), torch.randn(b, c, dt, generator=g))

    names = ["hist_visual", "hist_text", "mask", "cand_visual", "cand_text"]
    keep = [n for n in names if not ((dv == 0 and "visual" in n) or (dt == 0 and "text" in n))]
    stem = os.path.splitext(state)[0]
    axes = {n: ({0: "batch", 1: "candidates"} if n.startswith("cand") else {0: "batch"}) for n in keep}
    axes["scores"] = {0: "batch", 1: "candidates"}

    class Onnx(nn.Module):  # only the present modalities' inputs
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *xs):
            given = dict(zip(keep, xs))
            full = [given.get(n, torch.zeros(xs[0].shape[0], xs[0].shape[1], 0)) for n in names]
            return self.inner(*full)

    ex = example(2, 7)
    x = example(3, 50)
    with torch.no_grad():
        want = m(*x)
    scale = want.abs().max().item() + 1e-12
    if dtype != "f32":
        # A half copy traced (`m` stays the f32 reference); no ONNX.
        path = ts_name(stem, dtype)
        half = copy.deepcopy(m).to(DTYPES[dtype])
        half.masked = torch.finfo(DTYPES[dtype]).max / 2
        trace(half, cast(ex, dtype), path)
        with torch.no_grad():
            d = relative(want, torch.jit.load(path)(*cast(x, dtype)).float())
        print(f"scores (3 x 50): max |torch f32 - torchscript {dtype}| / max |torch| = {d:.2e}")
        assert d < HALF_LIMIT[dtype], "export does not reproduce the model"
        print("wrote", path)
        return
    ex_keep = tuple(x for n, x in zip(names, ex) if n in keep)
    save_onnx(stem + ".onnx", Onnx(m), ex_keep, keep, ["scores"], axes)
    trace(m, ex, stem + ".ts")

    import onnxruntime as ort
    with torch.no_grad():
        got_ts = torch.jit.load(stem + ".ts")(*x)
    sess = ort.InferenceSession(stem + ".onnx", providers=["CPUExecutionProvider"])
    got_onnx = sess.run(None, {n: v.numpy() for n, v in zip(names, x) if n in keep})[0]
    d_ts = (want - got_ts).abs().max().item() / scale
    d_onnx = abs(want.numpy() - got_onnx).max() / scale
    print(f"scores (3 x 50): max relative |torch - torchscript| = {d_ts:.2e}, |torch - onnx| = {d_onnx:.2e}")
    assert d_ts < 1e-5 and d_onnx < 1e-5, "export does not reproduce the model"
    print("wrote", stem + ".onnx", stem + ".ts")


if __name__ == "__main__":
    (state,), dtype = command_line(
        "python scripts/export_content_ranker.py STATE.safetensors [--dtype f32|f16|bf16]")
    main(state, dtype)
