"""Gemma 3's attention and block as a reader writes them (ch05/12_gemma3): head dim 256, one KV head at
270M, queries scaled by query_pre_attn_scalar^-0.5, QK-norm, and on five of every six layers a sliding
window of 512 keys passed in as the model's local mask."""

from __future__ import annotations

import torch
from torch import nn

from bench.book.rope import GemmaRMSNorm, apply_rope

GEMMA3_270M_SHAPE = {
    "emb_dim": 640,
    "n_heads": 4,
    "n_kv_groups": 1,
    "head_dim": 256,
    "hidden_dim": 2048,
    "query_pre_attn_scalar": 256,
    "sliding_window": 512,
}


class GroupedQueryAttention(nn.Module):
    def __init__(
        self, d_in, num_heads, num_kv_groups, head_dim=None, qk_norm=False, query_pre_attn_scalar=None, dtype=None
    ):
        super().__init__()
        assert num_heads % num_kv_groups == 0
        self.num_heads = num_heads
        self.num_kv_groups = num_kv_groups
        self.group_size = num_heads // num_kv_groups
        if head_dim is None:
            assert d_in % num_heads == 0
            head_dim = d_in // num_heads
        self.head_dim = head_dim
        self.d_out = num_heads * head_dim
        self.W_query = nn.Linear(d_in, self.d_out, bias=False, dtype=dtype)
        self.W_key = nn.Linear(d_in, num_kv_groups * head_dim, bias=False, dtype=dtype)
        self.W_value = nn.Linear(d_in, num_kv_groups * head_dim, bias=False, dtype=dtype)
        self.out_proj = nn.Linear(self.d_out, d_in, bias=False, dtype=dtype)
        if qk_norm:
            self.q_norm = GemmaRMSNorm(head_dim, eps=1e-6)
            self.k_norm = GemmaRMSNorm(head_dim, eps=1e-6)
        else:
            self.q_norm = self.k_norm = None
        self.scaling = (query_pre_attn_scalar if query_pre_attn_scalar is not None else head_dim) ** -0.5

    def forward(self, x, mask, cos, sin):
        b, n, _ = x.shape
        queries = self.W_query(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, n, self.num_kv_groups, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, n, self.num_kv_groups, self.head_dim).transpose(1, 2)
        if self.q_norm:
            queries = self.q_norm(queries)
        if self.k_norm:
            keys = self.k_norm(keys)
        queries = apply_rope(queries, cos, sin)
        keys = apply_rope(keys, cos, sin)
        keys = keys.repeat_interleave(self.group_size, dim=1)
        values = values.repeat_interleave(self.group_size, dim=1)
        queries = queries * self.scaling
        scores = (queries @ keys.transpose(2, 3)).masked_fill(mask, -torch.inf)
        weights = torch.softmax(scores, dim=-1)
        context = (weights @ values).transpose(1, 2).reshape(b, n, self.d_out)
        return self.out_proj(context)


def masks(n, sliding_window, device):
    """(global, local) as Gemma3Model builds them: causal, and causal plus keys i - j >= window hidden."""
    ones = torch.ones(n, n, dtype=torch.bool, device=device)
    global_ = torch.triu(ones, diagonal=1)
    far_past = torch.triu(ones, diagonal=sliding_window).T
    return global_, global_ | far_past


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], dtype=cfg["dtype"], bias=False)
        self.fc2 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], dtype=cfg["dtype"], bias=False)
        self.fc3 = nn.Linear(cfg["hidden_dim"], cfg["emb_dim"], dtype=cfg["dtype"], bias=False)

    def forward(self, x):
        return self.fc3(nn.functional.gelu(self.fc1(x), approximate="tanh") * self.fc2(x))


class TransformerBlock(nn.Module):
    """Gemma 3's block: four norms, the local (sliding-window) or global mask by the layer's type."""

    def __init__(self, cfg, attn_type):
        super().__init__()
        self.attn_type = attn_type
        self.att = GroupedQueryAttention(
            d_in=cfg["emb_dim"],
            num_heads=cfg["n_heads"],
            num_kv_groups=cfg["n_kv_groups"],
            head_dim=cfg["head_dim"],
            qk_norm=True,
            query_pre_attn_scalar=cfg["query_pre_attn_scalar"],
            dtype=cfg["dtype"],
        )
        self.ff = FeedForward(cfg)
        self.input_layernorm = GemmaRMSNorm(cfg["emb_dim"], eps=1e-6)
        self.post_attention_layernorm = GemmaRMSNorm(cfg["emb_dim"], eps=1e-6)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg["emb_dim"], eps=1e-6)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg["emb_dim"], eps=1e-6)

    def forward(self, x, mask_global, mask_local, cos, sin):
        mask = mask_local if self.attn_type == "sliding_attention" else mask_global
        x = x + self.post_attention_layernorm(self.att(self.input_layernorm(x), mask, cos, sin))
        return x + self.post_feedforward_layernorm(self.ff(self.pre_feedforward_layernorm(x)))
