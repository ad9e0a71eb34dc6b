"""Encoder throughput, side by side in one run: ragar's MiniLM encoder on
candle, ONNX Runtime and libtorch versus sentence-transformers (PyTorch, CPU)
on the same real weights, the same corpus (scripts/bench_titles.txt: 2,400
short product and movie titles), batch 32, two threads.

ragar is timed as a user runs it (`ragar stage encoder`), and the fixed cost
(process start, tokenizer and weight loading) is removed by also timing a run
on the first batch only: throughput = (N - 32) / (t_N - t_32). Best of
--repeats for every row. Prints a markdown table; --json writes the figures.

Usage: cargo build -p ragar-host --bin ragar && .ragar/venv/bin/python scripts/bench_encoder.py [--ragar PATH] [--repeats 3]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

THREADS = "2"
for var in ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"]:
    os.environ[var] = THREADS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("RAGAR_CACHE", os.path.join(ROOT, ".ragar"))
MODEL = os.path.join(CACHE, "models", "all-MiniLM-L6-v2")
BATCH = 32


def ragar_seconds(binary, backend, corpus, extra):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.safetensors")
        cmd = [binary, "stage", "encoder", "--config", os.path.join(ROOT, "configs/minilm.yaml"),
               "--text-file", corpus, "--out", out, f"encoder.backend={backend}",
               f"encoder.params.batch_size={BATCH}", *extra]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    # The test profile: dependencies (candle, tokenizers, ...) and ragar-core optimised.
    ap.add_argument("--ragar", default=os.path.join(ROOT, "target", "debug", "ragar"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--corpus", default=os.path.join(ROOT, "scripts", "bench_titles.txt"))
    ap.add_argument("--json")
    args = ap.parse_args()

    texts = open(args.corpus, encoding="utf-8").read().splitlines()
    n = len(texts)
    assert n >= 2000, "the corpus must have at least 2,000 titles"
    with tempfile.TemporaryDirectory() as d:
        head = os.path.join(d, "head.txt")
        with open(head, "w", encoding="utf-8") as f:
            f.write("\n".join(texts[:BATCH]) + "\n")
        rows = {}
        variants = [("candle", []), ("ort", []), ("ort int8", ["encoder.params.file=model_int8.onnx"]), ("tch", [])]
        for name, extra in variants:
            backend = name.split()[0]
            best = float("inf")
            for _ in range(args.repeats):
                full = ragar_seconds(args.ragar, backend, args.corpus, extra)
                fixed = ragar_seconds(args.ragar, backend, head, extra)
                best = min(best, full - fixed)
            rows[f"ragar {name}"] = (n - BATCH) / best

    import torch
    from sentence_transformers import SentenceTransformer
    torch.set_num_threads(int(THREADS))
    model = SentenceTransformer(MODEL, device="cpu")
    model.encode(texts[:BATCH], batch_size=BATCH)  # warm-up
    best = float("inf")
    for _ in range(args.repeats):
        t = time.perf_counter()
        model.encode(texts, batch_size=BATCH, convert_to_numpy=True)
        best = min(best, time.perf_counter() - t)
    ref = n / best
    rows["sentence-transformers (PyTorch)"] = ref

    print(f"| encoder ({n} titles, batch {BATCH}, {THREADS} threads) | sentences/s | vs sentence-transformers |")
    print("|---|---:|---:|")
    for k, v in rows.items():
        print(f"| {k} | {v:.0f} | {v / ref:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sentences": n, "batch": BATCH, "threads": int(THREADS), "sentences_per_s": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
