"""A worked example of a stream of dict batches: a causal language model on a local text file.

Written as a user's recipe would be (docs/recipes.md, "Data that streams"), and named by
import path: `recipe: "batchscope.trainers.recipes.token_lm:RECIPE"`. The text is read as
bytes (one token per byte, a vocabulary of 256: no tokenizer to ship) and stays on the host;
the training data is a factory that, given `(batch_size, seed)`, yields one epoch of
`{"input_ids", "labels"}` batches of windows in an order drawn from the seed. The model
takes `model(**batch)` and returns `{"loss", "logits"}` as Hugging Face models do, so the
recipe needs no loss function or step. Each batch counts `batch × seq_len` tokens: the runs
log `perf/tokens_per_s` and `final/tokens_to_target`, and a budget of `train.max_samples`
windows is a token budget of `max_samples × seq_len` tokens, the same for every batch size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from batchscope.trainers.recipes import Recipe
from batchscope.trainers.recipes.charlm import CharTransformer
from batchscope.trainers.task import DataTask

MODELS = ("transformer",)
VOCAB = 256  # bytes


class TokenLMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    text_file: str
    seq_len: int = Field(default=64, ge=2, le=4096)
    d_model: int = Field(default=64, ge=8)
    n_layers: int = Field(default=2, ge=1)
    n_heads: int = Field(default=4, ge=1)
    val_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)


def split(num_tokens: int, options: TokenLMOptions) -> tuple[int, int]:
    """Training and validation windows of seq_len+1 tokens (the last `val_fraction` of the file validates)."""
    n_val_tokens = int(num_tokens * options.val_fraction)
    n_train, n_val = (num_tokens - n_val_tokens - 1) // options.seq_len, (n_val_tokens - 1) // options.seq_len
    if n_train < 1 or n_val < 1:
        raise ValueError(
            f"token_lm: text_file={options.text_file!r} has {num_tokens} bytes, too few for one training and one "
            f"validation window of seq_len+1={options.seq_len + 1}: use a longer text or a smaller seq_len."
        )
    return n_train, n_val


def num_train(options: TokenLMOptions) -> int:
    """Training windows, from the file's size alone (for sample and epoch budgets)."""
    path = Path(options.text_file).expanduser()
    if not path.is_file():
        raise ValueError(f"token_lm: text_file={options.text_file!r} is not a file; set it to a local text file.")
    return split(os.path.getsize(path), options)[0]


class CausalLM(nn.Module):
    """`model(input_ids, labels=None)` -> {"logits"} and, given labels, the mean token cross-entropy "loss"."""

    def __init__(self, options: TokenLMOptions) -> None:
        super().__init__()
        self.net = CharTransformer(VOCAB, options.seq_len, options.d_model, options.n_layers, options.n_heads)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(input_ids)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.float().reshape(-1, VOCAB), labels.reshape(-1))
        return out


def window(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> dict[str, torch.Tensor]:
    """The windows at `starts` as a dict batch: input_ids and the same shifted by one (labels)."""
    rows = tokens[starts[:, None] + torch.arange(seq_len + 1)].long()
    return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}


def train_stream(tokens: torch.Tensor, seq_len: int) -> Any:
    """The factory `(batch_size, seed)` -> one epoch of full batches of windows, shuffled by the seed."""
    n = (len(tokens) - 1) // seq_len

    def epoch(batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        # A batch larger than the text takes windows from several shuffles.
        order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(batch_size / n))])
        for lo in range(0, len(order) - batch_size + 1, batch_size):
            yield window(tokens, order[lo : lo + batch_size] * seq_len, seq_len)

    return epoch


class Windows(Dataset[dict[str, torch.Tensor]]):
    """The validation windows in order, as a Dataset of dicts (the default collate stacks them)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = window(self.tokens, torch.tensor([i * self.seq_len]), self.seq_len)
        return {k: v[0] for k, v in batch.items()}


def perplexity(metrics: dict[str, float]) -> dict[str, float]:
    return {"ppl": math.exp(min(metrics["loss"], 50.0))}  # capped: a diverging run reports a huge number


def build(model: str, options: TokenLMOptions, device: torch.device) -> DataTask:
    if model not in MODELS:
        raise ValueError(f"token_lm: no model {model!r}; choose one of {MODELS}")
    num_train(options)  # refuses a missing or too short file with its own message
    tokens = torch.from_numpy(np.fromfile(Path(options.text_file).expanduser(), dtype=np.uint8))
    n_val_tokens = int(len(tokens) * options.val_fraction)
    train_tokens, val_tokens = tokens[: len(tokens) - n_val_tokens], tokens[len(tokens) - n_val_tokens :]
    return DataTask(
        model=CausalLM(options).to(device),
        train=train_stream(train_tokens, options.seq_len),
        val=Windows(val_tokens, options.seq_len),
        derived_metrics=perplexity,
        count=lambda batch: batch["input_ids"].numel(),  # tokens: from the shape, no host sync
        count_unit="tokens",
    )


RECIPE = Recipe(
    name="batchscope.trainers.recipes.token_lm:RECIPE",
    models=MODELS,
    options=TokenLMOptions,
    build=build,
    metrics=("val/loss", "val/ppl", "train/loss"),
    num_train=num_train,
)
