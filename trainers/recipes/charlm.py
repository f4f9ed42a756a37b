"""A character-level transformer language model trained on the user's local text file.

The text is encoded once (one token per character, the vocabulary being the
characters that occur in it) and put on the device whole. The first part is for
training, the last `val_fraction` for validation, so no window straddles the two.
An example is a fixed window of seq_len+1 characters: x the first seq_len, y the
same shifted by one. The model is a small GPT (pre-LayerNorm blocks, causal
self-attention through `scaled_dot_product_attention`, learned positions).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from batchscope.trainers.recipes.files import charlm_num_train as num_train  # noqa: F401  (the registry's)
from batchscope.trainers.recipes.files import read_text, split_lengths
from batchscope.trainers.recipes.options import CHARLM_METRICS as METRICS  # noqa: F401  (the registry's)
from batchscope.trainers.recipes.options import CHARLM_MODELS as MODELS
from batchscope.trainers.recipes.options import CharLMOptions
from batchscope.trainers.task import Task


def windows(tokens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive windows of seq_len+1 tokens as (x, y) views of `tokens`: no copy."""
    n = (len(tokens) - 1) // seq_len
    x = tokens[: n * seq_len].view(n, seq_len)
    y = tokens[1 : n * seq_len + 1].view(n, seq_len)
    return x, y


# ---- the model ----------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        # Eval mode with gradients on is sharpness, which differentiates twice (Hessian-vector
        # products): the fused CUDA kernels have no second derivative, the math kernel has.
        second_order = not self.training and torch.is_grad_enabled()
        with sdpa_kernel(SDPBackend.MATH) if second_order else nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Token ids (batch, time) -> next-token logits (batch, time, vocab)."""

    def __init__(self, vocab_size: int, seq_len: int, d_model: int, n_layers: int, n_heads: int) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, n_heads) for _ in range(n_layers)))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied input and output embeddings, as in GPT-2
        self.register_buffer("positions", torch.arange(seq_len), persistent=False)
        # GPT-2's initialization: small normal weights, residual projections scaled by depth.
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    positions: torch.Tensor

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(self.positions[:t])
        return self.head(self.ln_f(self.blocks(x)))


# ---- the task -------------------------------------------------------------------


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every token of the batch."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def perplexity(metrics: dict[str, float]) -> dict[str, float]:
    # Capped so that a diverging run reports a huge number rather than overflowing.
    return {"ppl": math.exp(min(metrics["loss"], 50.0))}


def build(model: str, options: CharLMOptions, device: torch.device) -> Task:
    if model != "transformer":
        raise ValueError(f"charlm has no model {model!r}; choose one of {MODELS}.")
    text = read_text(options.text_file)
    n_train, _ = split_lengths(len(text), options)
    vocab = sorted(set(text))
    lookup = {ch: i for i, ch in enumerate(vocab)}
    tokens = torch.tensor([lookup[ch] for ch in text], dtype=torch.long).to(device)  # the whole text, once
    train_x, train_y = windows(tokens[:n_train], options.seq_len)
    val_x, val_y = windows(tokens[n_train:], options.seq_len)
    net = CharTransformer(len(vocab), options.seq_len, options.d_model, options.n_layers, options.n_heads)
    return Task(
        model=net.to(device),
        train_x=train_x,
        train_y=train_y,
        val_x=val_x,
        val_y=val_y,
        loss_fn=token_cross_entropy,
        classification=True,  # per-token accuracy
        derived_metrics=perplexity,
        tokens_per_example=options.seq_len,
    )
