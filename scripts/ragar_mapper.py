"""RAGAR's Mapper in PyTorch (the reference transcription of
plugins/candle/src/mapper.rs): GILL's Modal Mapper (fc ->
torch.nn.Transformer(norm_first, ReLU, dropout 0) with learned queries ->
Linear, Eq. 8) and the Balance Calibrator (x + MultiheadAttention(LayerNorm(x),
kw_proj(kw)), Eq. 9), with the training-only projections of the calibrator
and semantic losses. Weight names are the checkpoint's. Used by
scripts/fixtures/make_mapper.py (parity fixture) and scripts/export_mapper.py.
"""
import torch
from torch import nn


class Calibrator(nn.Module):
    def __init__(self, c):
        super().__init__()
        o = c["output_dim"]
        self.kw_proj = nn.Linear(c["keyword_dim"], c["keyword_tokens"] * o)
        self.norm = nn.LayerNorm(o)
        self.attn = nn.MultiheadAttention(o, c["calibrator_heads"], batch_first=True)
        if c["retrieval_dim"] != o:
            self.cal_proj = nn.Linear(o, c["retrieval_dim"], bias=False)
        if c.get("semantic_dim", 0):
            self.sem_proj = nn.Linear(o, c["semantic_dim"], bias=False)


class Mapper(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        h = c["hidden_dim"]
        self.fc = nn.Linear(c["input_dim"], h)
        self.tfm = nn.Transformer(d_model=h, nhead=c["heads"], num_encoder_layers=c["layers"],
                                  num_decoder_layers=c["layers"], dim_feedforward=c["ffn_dim"], dropout=0.0,
                                  batch_first=True, norm_first=True)
        self.query_embs = nn.Parameter(torch.randn(1, c["n_queries"], h))
        self.model = nn.Linear(h, c["output_dim"])
        self.calibrator = Calibrator(c)

    def forward(self, x, kw):
        """x: [b, 1 + n_img, input_dim] (text-related embedding, then the
        [IMG] states); kw: [b, keyword_dim] -> (mapped, preference), each
        [b, n_queries, output_dim]."""
        mem = self.fc(x)
        mapped = self.model(self.tfm(mem, self.query_embs.expand(x.shape[0], -1, -1)))
        kv = self.calibrator.kw_proj(kw).reshape(kw.shape[0], self.c["keyword_tokens"], self.c["output_dim"])
        q = self.calibrator.norm(mapped)
        pref = mapped + self.calibrator.attn(q, kv, kv, need_weights=False)[0]
        return mapped, pref
