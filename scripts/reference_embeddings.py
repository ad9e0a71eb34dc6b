"""Reference sentence embeddings from sentence-transformers (PyTorch, CPU),
the numbers every ragar backend's MiniLM encoder is tested against.

Usage: python scripts/reference_embeddings.py MODEL_DIR TEXTS.txt OUT.json
One text per line; empty lines are embedded as the empty string, as ragar does.
"""
import json
import sys

from sentence_transformers import SentenceTransformer


def main(model_dir, texts_path, out_path):
    with open(texts_path, encoding="utf-8") as f:
        texts = f.read().split("\n")
    if texts and texts[-1] == "":
        texts.pop()
    model = SentenceTransformer(model_dir, device="cpu")
    emb = model.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=False)
    out = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "max_seq_length": model.max_seq_length,
        "texts": texts,
        "embeddings": [[round(float(x), 8) for x in row] for row in emb],
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f)
        f.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
