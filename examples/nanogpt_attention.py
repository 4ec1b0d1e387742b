"""nanoGPT's causal self-attention on scratchformer's kernel: one line changes.

    python examples/nanogpt_attention.py [--device cuda] [--steps 200]

nanoGPT's `CausalSelfAttention.forward` ends its attention with

    y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=dropout, is_causal=True)

and with scratchformer it is

    y = ops.causal_attention(q, k, v)

Same shapes in and out ([batch, heads, time, head_dim]), same causal mask; on a GPU it runs our
fused kernel (fp32, fp16 or bf16, head_dim 32/64/96/128), elsewhere our reference. Attention
dropout is the one thing it leaves out (nanoGPT trains with dropout 0 by default). Below, a
nanoGPT-shaped model trains on bundled WikiText bytes with the changed line, after a check that
both lines give the same output and gradients.
"""

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from scratchformer import data, ops


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, use_scratchformer: bool = True):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd, self.use_scratchformer = n_head, n_embd, use_scratchformer

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.use_scratchformer:
            y = ops.causal_attention(q, k, v)  # <- the one line
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ByteGPT(nn.Module):
    def __init__(self, block_size=128, n_layer=4, n_embd=128, n_head=4):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(256, n_embd), nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        for embedding in (self.wte, self.wpe):  # nanoGPT's init: small, so tied logits start near zero
            nn.init.normal_(embedding.weight, std=0.02)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)

    # 1. The changed line computes what the original did.
    attn = CausalSelfAttention(64, 4).to(args.device)
    x = torch.randn(2, 50, 64, device=args.device, requires_grad=True)
    ours = attn(x)
    grad_ours = torch.autograd.grad(ours.sum(), x)[0]
    attn.use_scratchformer = False
    theirs = attn(x)
    grad_theirs = torch.autograd.grad(theirs.sum(), x)[0]
    print(f"largest difference from SDPA: output {(ours - theirs).abs().max():.2e}, gradient {(grad_ours - grad_theirs).abs().max():.2e}")

    # 2. A nanoGPT-shaped model trains with it.
    text = "".join(data.load_corpus("wikitext2-mini", progress=False)["train"].documents[:20]).encode("utf-8")
    stream = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    model = ByteGPT().to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(stream) - 129, (16,), generator=generator)
        batch = torch.stack([stream[s : s + 129] for s in starts.tolist()]).to(args.device)
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % max(args.steps // 4, 1) == 0:
            print(f"step {step}: loss {loss.item():.3f} nats/byte (uniform: {math.log(256):.3f})")


if __name__ == "__main__":
    main()
