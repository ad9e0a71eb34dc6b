"""scripts/onnx_shapes.py folds a cached decoder's shape arithmetic without
changing what it computes (tests/tests/onnx_exports.rs runs this).

The tiny Qwen2 checkpoint's decoder is exported as torch.onnx writes it
(unfolded), and folded; ONNX Runtime runs both through prompts cut into
cached pieces at batch 1 and 3, and every output (logits and the cache)
must agree to 1e-6, while the folded graph keeps under half the Shape
nodes and has no Reshape whose target is computed from a Shape chain of
the layer's own input.

Usage: python tests/python/onnx_shapes_fold.py CACHE
"""
import collections
import os
import shutil
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
import onnx_shapes  # noqa: E402
from export_llm import cache_shape, decoder_graph, load_model  # noqa: E402


def shape_nodes(path):
    return collections.Counter(n.op_type for n in onnx.load(path).graph.node)["Shape"]


def run(session, ids, pieces, kv, hd, layers):
    """Each piece's outputs, the cache carried from piece to piece."""
    rows = ids.shape[0]
    cache = [np.zeros((rows, kv, 0, hd), np.float32) for _ in range(2 * layers)]
    outs = []
    for a, b in pieces:
        feed = {"input_ids": ids[:, a:b], "attention_mask": np.ones((rows, b), np.int64),
                "position_ids": np.tile(np.arange(a, b, dtype=np.int64), (rows, 1))}
        feed.update({i.name: c for i, c in zip(session.get_inputs()[3:], cache)})
        out = session.run(None, feed)
        outs.append(out)
        cache = out[1:]
    return outs


def main(cache_dir):
    model_dir = os.path.join(cache_dir, "models", "qwen2-tiny-chat")
    model = load_model(model_dir)
    cfg = model.config
    kv, hd = cache_shape(cfg)
    module, example, names, outs, axes = decoder_graph(model, torch.Generator().manual_seed(1))
    tmp = tempfile.mkdtemp()
    try:
        plain, folded = os.path.join(tmp, "plain.onnx"), os.path.join(tmp, "folded.onnx")
        torch.onnx.export(module, example, plain, dynamo=False, opset_version=17, input_names=names,
                          output_names=outs, dynamic_axes=axes)
        shutil.copy(plain, folded)
        counts = onnx_shapes.fold_file(folded)
        before, after = shape_nodes(plain), shape_nodes(folded)
        print(f"folded {counts}; Shape nodes {before} -> {after}")
        assert after * 2 < before, "the fold left most of the shape arithmetic"
        # The attention's q / k / v views: [batch, sequence, heads, head_dim]
        # from [batch, sequence, hidden] -- their targets must be constants.
        graph = onnx.load(folded).graph
        constant = {i.name for i in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
        views = [n for n in graph.node if n.op_type == "Reshape" and "self_attn/Reshape" in n.name
                 and n.name.rsplit("Reshape", 1)[1] in ("", "_1", "_2")]
        computed = [n.name for n in views if n.input[1] not in constant]
        print(f"q / k / v views {len(views)}, with computed targets {computed}")
        assert views and not computed
        sessions = [ort.InferenceSession(p, providers=["CPUExecutionProvider"]) for p in (plain, folded)]
        g = np.random.default_rng(0)
        worst = 0.0
        for rows, pieces in [(1, [(0, 6), (6, 7), (7, 10)]), (3, [(0, 4), (4, 5), (5, 6)]), (1, [(0, 1), (1, 2)])]:
            ids = g.integers(0, cfg.vocab_size, (rows, pieces[-1][1]), dtype=np.int64)
            a, b = (run(s, ids, pieces, kv, hd, cfg.num_hidden_layers) for s in sessions)
            for pa, pb in zip(a, b):
                for x, y in zip(pa, pb):
                    assert x.shape == y.shape, (x.shape, y.shape)
                    worst = max(worst, float(np.abs(x - y).max()) if x.size else 0.0)
        print(f"max |unfolded - folded| over logits and caches: {worst:.2e}")
        assert worst <= 1e-6
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main(sys.argv[1])
