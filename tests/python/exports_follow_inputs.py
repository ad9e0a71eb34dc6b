"""The TorchScript modules scripts/setup.sh exported run on the device
their inputs are on (tests/tests/torchscript_exports.rs runs this).

1. No module under CACHE/models holds a device constant (what a trace on
   the CPU records, and what then mixes CPU and CUDA tensors on cuda:N).
2. Functionally, without a GPU: the modules without convolutions (the meta
   device has no TorchScript convolution) run with their weights and inputs
   on the `meta` device, which refuses any tensor made on the CPU on the way.

Usage: python tests/python/exports_follow_inputs.py CACHE
"""
import glob
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from ragar_export import device_constants  # noqa: E402


def on_meta(path):
    m = torch.jit.load(path)
    for sm in m.modules():
        for name, t in list(sm.named_parameters(recurse=False)) + list(sm.named_buffers(recurse=False)):
            sm._c.setattr(name, t.detach().to("meta"))
    return m


def main(cache):
    files = sorted(glob.glob(os.path.join(cache, "models", "**", "*.ts"), recursive=True))
    bad = [(os.path.relpath(f, cache), n) for f in files if (n := device_constants(f))]
    print(f"{len(files)} TorchScript modules, {len(bad)} with device constants {bad}")
    assert len(files) >= 20 and not bad
    ids = torch.zeros(2, 7, dtype=torch.long, device="meta")
    for rel, inputs in [
        ("clip-tiny-e2e/text_model.ts", (ids, torch.ones_like(ids))),
        ("clip-tiny-e2e/text_model.f16.ts", (ids, torch.ones_like(ids))),
        ("sd-tiny/text_encoder/model.ts", (torch.zeros(2, 77, dtype=torch.long, device="meta"),)),
        ("all-MiniLM-L6-v2/model.ts", (ids, torch.ones_like(ids), torch.zeros_like(ids))),
    ]:
        with torch.no_grad():
            out = on_meta(os.path.join(cache, "models", rel))(*inputs)
        print(f"{rel}: ran on {out.device}, {tuple(out.shape)}")
        assert out.device.type == "meta"


if __name__ == "__main__":
    main(sys.argv[1])
