"""Small CIFAR-10 files in the real format (python pickle batches), written for tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_fake_cifar10(folder: str | Path, n_per_batch: int = 50, seed: int = 0) -> Path:
    """Write `data_batch_1` … `data_batch_5`, `test_batch` and `batches.meta` into `folder`.

    Each batch is a pickled dict like the real ones (bytes keys, as Python 2 wrote them):
    b"data" uint8 (n, 3072) with rows laid out as 1024 red, 1024 green, 1024 blue values
    (row-major 32×32), b"labels" a list of ints, b"batch_label" and b"filenames".
    Each class has its own colour, plus noise: learnable in a few steps, and unchanged in
    kind by crops and flips.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 226, size=(10, 3)).astype(np.float64)
    patterns = np.repeat(colours, 32 * 32, axis=1)  # (10, 3072): R plane, G plane, B plane
    for i, name in enumerate(FILES):
        labels = (np.arange(n_per_batch) + i) % 10
        rng.shuffle(labels)
        noise = rng.normal(0.0, 40.0, size=(n_per_batch, 3072))
        data = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
        batch = {
            b"batch_label": f"fake {name}".encode(),
            b"labels": [int(v) for v in labels],
            b"data": data,
            b"filenames": [f"fake_{i}_{j}.png".encode() for j in range(n_per_batch)],
        }
        with open(out / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {b"label_names": [n.encode() for n in LABEL_NAMES], b"num_cases_per_batch": n_per_batch, b"num_vis": 3072}
    with open(out / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return out
