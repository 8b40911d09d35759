"""A small stand-in with the GPT's parameter names and shapes (used only until nanochat_nb.gpt exists)."""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    sequence_len: int = 64
    vocab_size: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 128

    @classmethod
    def from_depth(cls, depth, vocab_size=256, sequence_len=64, head_dim=32, aspect_ratio=64):
        dim = math.ceil(depth * aspect_ratio / head_dim) * head_dim
        return cls(sequence_len, vocab_size, depth, dim // head_dim, dim // head_dim, dim)


def has_ve(i, n_layer):
    return i % 2 == (n_layer - 1) % 2


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        c, d = config, config.n_embd
        self.config, self.head_dim = c, d // c.n_head
        kv = c.n_kv_head * self.head_dim
        def block(i):
            attn = nn.ModuleDict(dict(c_q=nn.Linear(d, d, bias=False), c_k=nn.Linear(d, kv, bias=False),
                                      c_v=nn.Linear(d, kv, bias=False), c_proj=nn.Linear(d, d, bias=False)))
            if has_ve(i, c.n_layer):
                attn["ve_gate"] = nn.Linear(12, c.n_kv_head, bias=False)
            mlp = nn.ModuleDict(dict(c_fc=nn.Linear(d, 4 * d, bias=False), c_proj=nn.Linear(4 * d, d, bias=False)))
            return nn.ModuleDict(dict(attn=attn, mlp=mlp))
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(c.vocab_size, d),
                                              h=nn.ModuleList([block(i) for i in range(c.n_layer)])))
        self.lm_head = nn.Linear(d, c.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(c.n_layer))
        self.x0_lambdas = nn.Parameter(torch.full((c.n_layer,), 0.1))
        self.smear_gate = nn.Linear(24, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.full((1,), 0.1))
        self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(c.vocab_size, kv)
                                           for i in range(c.n_layer) if has_ve(i, c.n_layer)})

    def init_weights(self):
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, 0, p.shape[1] ** -0.5)

    def forward(self, idx, targets):
        c, (B, T) = self.config, idx.shape
        norm = lambda t: F.rms_norm(t, (t.size(-1),))
        x = norm(self.transformer.wte(idx))
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, 1:, :24]))
        x = x0 = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            a, h = block["attn"], norm(x)
            q = a["c_q"](h).view(B, T, c.n_head, -1).transpose(1, 2)
            k = a["c_k"](h).view(B, T, c.n_kv_head, -1).transpose(1, 2)
            v = a["c_v"](h).view(B, T, c.n_kv_head, -1)
            if str(i) in self.value_embeds:
                ve = self.value_embeds[str(i)](idx).view(B, T, c.n_kv_head, -1)
                v = v + 3 * torch.sigmoid(a["ve_gate"](h[..., :12])).unsqueeze(-1) * ve
            y = F.scaled_dot_product_attention(norm(q), norm(k), v.transpose(1, 2), is_causal=True)
            x = x + a["c_proj"](y.transpose(1, 2).reshape(B, T, -1))
            x = x + block["mlp"]["c_proj"](F.relu(block["mlp"]["c_fc"](norm(x))).square())
            if i == c.n_layer // 2 - 1 or c.n_layer == 1:
                x_mid = x
        logits = self.lm_head(norm(x - self.backout_lambda * x_mid))
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
