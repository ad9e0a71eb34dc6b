"""Each TorchScript module scripts/setup.sh exported holds only weights its
forward uses (tests/tests/torchscript_exports.rs runs this). A traced module
keeps every parameter of the submodules its wrapper holds, used or not: a
wrapper holding the whole model for one part of it wrote BLIP-base's
cross-keys module at 454 MB instead of 57 MB, and would write a BLIP-2
image-queries module with OPT-2.7B's 10 GB inside.

A parameter is used when the module's forward, inlined, reads it (a
prim::GetAttr path to it). Allowed unused: BLIP's cross-attention key /
value projections in the cached decoder (the cross keys module computes
them once per image; the decoder takes them as inputs) and BERT's pooler
(the sentence embedding is the mean of the last hidden state). Buffers
(position ids, rotary frequencies) are not weights and are left alone.

Usage: python tests/python/exports_hold_used_weights.py CACHE
"""
import glob
import os
import re
import sys

import torch

ALLOWED = re.compile(r"crossattention\.self\.(key|value)\.|pooler\.")


def unused_weights(path):
    """Names of the module's parameters its inlined forward never reads."""
    m = torch.jit.load(path).eval()
    graph = m.inlined_graph
    paths = {}
    for node in graph.findAllNodes("prim::GetAttr"):
        owner = paths.get(next(node.inputs()).unique(), "")
        paths[node.output().unique()] = f"{owner}.{node.s('name')}" if owner else node.s("name")
    read = set(paths.values())
    return [name for name, _ in m.named_parameters() if name not in read]


def main(cache):
    files = sorted(glob.glob(os.path.join(cache, "models", "**", "*.ts"), recursive=True))
    assert len(files) >= 20, files
    bad = {}
    for f in files:
        unused = unused_weights(f)
        allowed = [n for n in unused if ALLOWED.search(n)]
        print(f"{os.path.relpath(f, cache)}: {len(unused)} unused weights ({len(allowed)} allowed)")
        if len(allowed) < len(unused):
            bad[os.path.relpath(f, cache)] = [n for n in unused if not ALLOWED.search(n)][:5]
    print(f"{len(files)} TorchScript modules, {len(bad)} holding weights they do not use {bad}")
    assert not bad


if __name__ == "__main__":
    main(sys.argv[1])
