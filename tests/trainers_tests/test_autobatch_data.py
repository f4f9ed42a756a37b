"""AutoBatch on recipes whose data streams (trainers.task.DataTask), under real memory limits.

The probes train on real batches of the recipe's data: PNG files decoded through a Dataset
(image_folder), dict batches from a factory (token_lm), and the test blobs in every form,
against the same blobs in memory. On a CPU each probe is a forked process whose peak
resident memory is measured against the budget, with an address-space limit set from it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchscope.trainers.autobatch import find_batch_size
from batchscope.trainers.memory_probe import AutoBatchError, MemoryProber
from batchscope.trainers.spec import TrainSpec
from tests.trainers_tests.test_memory import cuda

BLOBS = "tests.trainers_tests.data_recipes:build"


def data_spec(recipe: str, model: str, options: dict[str, Any], **kw: Any) -> TrainSpec:
    base: dict[str, Any] = dict(
        recipe=recipe,
        model=model,
        recipe_options=options,
        batch_size=1,
        lr=0.1,
        max_steps=2,
        device="cpu",
        precision="fp32",
        sharpness=False,
    )
    return TrainSpec(**(base | kw))


def write_images(root: Path, train_per_class: int = 150, val_per_class: int = 20, size: int = 16) -> Path:
    """An image_folder layout of small PNGs: two classes told apart by their dominant colour."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(("reddish", "bluish")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
                pixels[..., 2 * c] += 120
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def within_budget_and_near_the_edge(prober: MemoryProber, spec: TrainSpec, headroom_mb: float) -> int:
    """AutoBatch under (baseline + headroom): the answer was measured within the budget, and a
    batch a quarter larger does not fit (the answer is within 80% of what fits)."""
    baseline = prober.probe(1).peak_mb
    assert baseline is not None
    budget = baseline + headroom_mb
    result = find_batch_size(spec, budget_mb=budget, cap_at_dataset=False, max_batch=2**20, prober=prober)
    print(f"\n{result.table()}\n{result.method}")
    assert result.verified_peak_mb <= budget
    assert any(p.batch_size == result.batch_size and p.fits for p in result.probes)
    assert any(p.status in ("over_budget", "oom") for p in result.probes)  # memory, not data, bounded it
    assert result.capped_by is None and result.mb_per_example > 0
    assert not prober.probe(math.ceil(result.batch_size / 0.8), budget_mb=budget).fits
    return result.batch_size


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_images(tmp_path_factory.mktemp("images"))


def test_image_folder_autobatch_under_a_real_memory_cap(images: Path) -> None:
    # PNG files decoded through the recipe's Dataset at every probed size; 300 training images.
    spec = data_spec(
        "batchscope.trainers.recipes.image_folder:build",
        "cnn",
        {"data_dir": str(images), "image_size": 16, "width": 8},
    )
    with MemoryProber(spec, device="cpu") as prober:
        assert within_budget_and_near_the_edge(prober, spec, 100.0) > 300  # batches span epochs, as in memory
        # The in-memory rule: no batch past the training set, which fits here.
        capped = find_batch_size(spec, budget_mb=4096, prober=prober)
    assert capped.batch_size == 300 and capped.capped_by == "dataset"
    assert "300 training examples" in capped.method


def test_token_lm_dict_batches_autobatch_under_a_real_memory_cap(tmp_path: Path) -> None:
    text = tmp_path / "input.txt"
    text.write_text("to be or not to be, that is the question. " * 2000, encoding="utf-8")
    options = {"text_file": str(text), "seq_len": 32, "d_model": 32, "n_layers": 1, "n_heads": 2}
    spec = data_spec("batchscope.trainers.recipes.token_lm:RECIPE", "transformer", options)
    with MemoryProber(spec, device="cpu") as prober:
        within_budget_and_near_the_edge(prober, spec, 100.0)
        # A stream's size is the one its Recipe states (num_train: 2362 windows of 33 bytes).
        capped = find_batch_size(spec, budget_mb=4096, prober=prober)
    assert capped.num_train == 2362 and capped.batch_size == 2362 and capped.capped_by == "dataset"


def test_dataset_recipe_agrees_with_the_same_data_in_memory() -> None:
    # The same blobs and model, as a Dataset and as tensors on the device: the same rule
    # (largest batch under the budget) lands within a few percent, the Dataset's collated
    # batch being the only difference in memory.
    answers = {}
    for form in ("memory", "dataset"):
        spec = data_spec(BLOBS, "mlp", {"form": form, "n": 512, "hidden": 2048})
        with MemoryProber(spec, device="cpu") as prober:
            answers[form] = within_budget_and_near_the_edge(prober, spec, 200.0)
    assert answers["dataset"] == pytest.approx(answers["memory"], rel=0.15), answers


def test_a_stream_smaller_than_the_batch_caps_the_search_at_its_size() -> None:
    # A factory of full batches of 512 blobs gives no batch of 513: the search stops at the
    # data as it stops at an in-memory training set, and says so.
    spec = data_spec(BLOBS, "mlp", {"form": "stream", "n": 512})
    result = find_batch_size(spec, budget_mb=4096)
    assert result.batch_size == 512 and result.capped_by == "dataset"
    assert any(p.status == "no_batch" for p in result.probes)
    assert "capped by the training data" in result.method


def test_a_recipe_refusal_in_the_probe_is_its_one_line() -> None:
    # A step that returns one loss per example: the recipe's check, not a child's traceback.
    spec = data_spec(BLOBS, "mlp", {"form": "collate", "bad": "per_example"})
    with pytest.raises(AutoBatchError) as refused:
        find_batch_size(spec, budget_mb=4096)
    message = str(refused.value)
    assert "the loss must be the mean over the batch" in message
    assert "Traceback" not in message and len(message.splitlines()) == 1


@pytest.fixture()
def no_gpu_memory_left_over() -> Iterator[None]:
    import torch

    yield
    torch.cuda.empty_cache()


@cuda
@pytest.mark.usefixtures("no_gpu_memory_left_over")
def test_autobatch_on_cuda_with_dict_batches_stays_within_budget() -> None:
    spec = data_spec(BLOBS, "mlp", {"form": "collate", "n": 512, "hidden": 4096}, device="cuda")
    budget = 1024.0
    result = find_batch_size(spec, budget_mb=budget, cap_at_dataset=False, max_batch=2**22)
    print(f"\n{result.table()}\n{result.method}")
    assert result.verified_peak_mb <= budget and result.capped_by is None
    with MemoryProber(spec, budget_mb=budget) as prober:
        assert not prober.probe(math.ceil(result.batch_size / 0.8)).fits
    # In this process too, a stream too small for the batch caps the search at its size.
    stream = data_spec(BLOBS, "mlp", {"form": "stream", "n": 512}, device="cuda")
    assert find_batch_size(stream, budget_mb=budget).capped_by == "dataset"
