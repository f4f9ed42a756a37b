"""The built-in recipes' data files, read without torch.

The sweep process needs a recipe's training-set size to turn a sample or epoch budget into
steps, and it never imports torch (1–2 s of start-up, and the recipes' modules import it):
the CIFAR-10 batches and the char-LM text are read here with pickle, numpy and plain Python,
and the recipes build their tensors from what these return.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from batchscope.trainers.recipes.options import CharLMOptions, Cifar10Options

CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # The batches are pickles written by Python 2: keys and strings come back as bytes.
    # Unpickling runs code from the file, so only point data_dir at files you trust.
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"cifar10: {path} is not a CIFAR-10 python batch (a dict with b'data' and b'labels').")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(
            f"cifar10: {path} has data of shape {data.shape} and {len(labels)} labels; "
            "expected (N, 3072) uint8 rows and N labels."
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: str | Path, train_batches: int = 5, limit: int | None = None) -> dict[str, np.ndarray]:
    """x (N, 3, 32, 32) uint8 and y int64 for training (the first `train_batches` files) and validation."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise ValueError(
            f"cifar10: data_dir={str(data_dir)!r} is not a folder; set data_dir to the extracted "
            "'cifar-10-batches-py' folder of the CIFAR-10 python version."
        )
    names = (*CIFAR10_TRAIN_FILES[:train_batches], CIFAR10_TEST_FILE)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise ValueError(
            f"cifar10: data_dir={str(data_dir)!r} has no file {missing[0]!r}; it must hold "
            f"{', '.join(names)} (the CIFAR-10 python version), or lower train_batches."
        )
    parts = [_read_batch(folder / n) for n in CIFAR10_TRAIN_FILES[:train_batches]]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    x_val, y_val = _read_batch(folder / CIFAR10_TEST_FILE)
    return {"x": x[:limit], "y": y[:limit], "x_val": x_val[:limit], "y_val": y_val[:limit]}


def cifar10_num_train(options: Cifar10Options) -> int:
    """Training-set size (reads the label lists of the training files)."""
    arrays = load_cifar10(options.data_dir, options.train_batches, options.limit)
    return len(arrays["y"])


def read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "does not exist"
        raise ValueError(f"charlm: text_file={path!r} {what}; set text_file to a local UTF-8 text file.")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"charlm: text_file={path!r} is not UTF-8 text ({exc}).") from None


def split_lengths(num_chars: int, options: CharLMOptions) -> tuple[int, int]:
    """Characters for training and for validation; each part must hold one window of seq_len+1."""
    n_val = int(num_chars * options.val_fraction)
    n_train = num_chars - n_val
    need = options.seq_len + 1
    if n_train < need or n_val < need:
        raise ValueError(
            f"charlm: text_file={options.text_file!r} has {num_chars} characters, split into {n_train} for "
            f"training and {n_val} for validation (val_fraction={options.val_fraction}); each part needs at "
            f"least seq_len+1={need}: use a longer text or a smaller seq_len."
        )
    return n_train, n_val


def charlm_num_train(options: CharLMOptions) -> int:
    """Training examples (windows) the text gives (reads the file)."""
    n_train, _ = split_lengths(len(read_text(options.text_file)), options)
    return (n_train - 1) // options.seq_len
