"""The recipes beyond MNIST-1D (digits, CIFAR-10, char-level LM) and user recipes by import path."""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from batchscope.trainers.evaluation import target_reached
from batchscope.trainers.loop import train
from batchscope.trainers.recipes import RECIPES, build_task, get_recipe
from batchscope.trainers.recipes.charlm import CausalSelfAttention, CharLMOptions
from batchscope.trainers.recipes.cifar10 import load_cifar10, random_crop, random_flip
from batchscope.trainers.recipes.digits import DigitsOptions
from batchscope.trainers.spec import RecordingSink, TrainResult, TrainSpec
from batchscope.trainers.task import Task
from tests.trainers_tests.cifar_fixtures import write_fake_cifar10

CPU = torch.device("cpu")
EXAMPLE = "tests.trainers_tests.example_recipe"
HERE = "tests.trainers_tests.test_recipes"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # These models are tiny: one thread is faster than two that wait on each other,
    # and much faster when the machine's cores are busy with other work.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_cifar10(tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py", n_per_batch=64, seed=0)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "input.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 100, encoding="utf-8")
    return path


def charlm_options(text_file: Path, **kw: Any) -> dict[str, Any]:
    return {"text_file": str(text_file), "seq_len": 16, "d_model": 32, "n_layers": 1, "n_heads": 2, **kw}


def run(recipe: str, model: str, options: dict[str, Any], **kw: Any) -> tuple[TrainResult, list[float]]:
    base: dict[str, Any] = dict(
        log_every_step=True,  # these tests read every step's loss
        recipe=recipe,
        model=model,
        recipe_options=options,
        batch_size=32,
        lr=0.05,
        max_steps=30,
        eval_every=15,
        device="cpu",
        sharpness_iters=3,
    )
    base.update(kw)
    sink = RecordingSink()
    result = train(TrainSpec(**base), sink)
    return result, [v for _, v in sink.history["train/loss"]]


def fell(losses: list[float]) -> bool:
    """The mean of the last five steps is clearly below the first step."""
    return sum(losses[-5:]) / 5 < losses[0] - 0.2


# ---- built-in recipes train --------------------------------------------------------


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_digits_loss_falls(norm: str) -> None:
    result, losses = run("digits", "cnn", {"channels": 8, "norm": norm}, batch_size=64)
    assert result.status == "ok"
    assert fell(losses)
    assert result.final["final/val_acc"] > 0.2  # 10 classes: chance is 0.1


def test_digits_split_is_stratified_standardized_and_fixed() -> None:
    task = build_task("digits", "cnn", {"norm": "none", "channels": 4}, CPU)
    again = build_task("digits", "cnn", {"norm": "none", "channels": 4}, CPU)
    assert task.num_train + len(task.val_x) == 1797
    count = RECIPES["digits"].num_train
    assert count is not None and task.num_train == count(DigitsOptions())
    assert tuple(task.train_x.shape[1:]) == (1, 8, 8)
    assert torch.equal(task.val_y, again.val_y)  # the data seed is fixed, not the trial's seed
    assert abs(float(task.train_x.mean())) < 1e-4 and abs(float(task.train_x.std()) - 1) < 1e-3
    # Stratified: every class has about a fifth of its examples in validation.
    counts = torch.bincount(task.val_y, minlength=10)
    assert int(counts.min()) >= 33 and int(counts.max()) <= 38


@pytest.mark.parametrize(("norm", "layer"), [("batch", nn.BatchNorm2d), ("group", nn.GroupNorm), ("none", None)])
def test_digits_norm_option_picks_the_layer(norm: str, layer: type[nn.Module] | None) -> None:
    model = build_task("digits", "cnn", {"norm": norm, "channels": 4}, CPU).model
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d | nn.GroupNorm)]
    if layer is None:
        assert norms == []
    else:
        assert len(norms) == 3 and all(isinstance(m, layer) for m in norms)


def test_cifar10_loss_falls_on_files_in_the_real_format(cifar_dir: Path) -> None:
    result, losses = run("cifar10", "resnet9", {"data_dir": str(cifar_dir), "width": 4, "train_batches": 2})
    assert result.status == "ok"
    assert fell(losses)


def test_cifar10_loader_reads_the_pickled_batches(cifar_dir: Path) -> None:
    arrays = load_cifar10(cifar_dir, train_batches=3)
    with open(cifar_dir / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert arrays["x"].shape == (3 * 64, 3, 32, 32) and arrays["x"].dtype == np.uint8
    assert arrays["x_val"].shape == (64, 3, 32, 32)
    # Rows are 1024 red, then green, then blue values, row-major: image 0 of batch 2 is row 64.
    assert np.array_equal(arrays["x"][64].reshape(-1), raw[b"data"][0])
    assert arrays["x"][64, 1, 0, 5] == raw[b"data"][0][1024 + 5]
    assert arrays["y"][64:128].tolist() == raw[b"labels"]
    assert len(load_cifar10(cifar_dir, train_batches=5, limit=100)["y"]) == 100


def test_cifar10_data_stay_uint8_on_the_device(cifar_dir: Path) -> None:
    task = build_task("cifar10", "resnet9", {"data_dir": str(cifar_dir), "width": 2, "limit": 40}, CPU)
    assert task.train_x.dtype == torch.uint8 and task.num_train == 40 and len(task.val_x) == 40

    # Evaluation is deterministic; training mode augments, unless augment is off.
    x = task.val_x[:8]
    task.model.eval()
    assert torch.equal(task.model(x), task.model(x))
    task.model.train()
    assert not torch.equal(task.model(x), task.model(x))
    plain = build_task("cifar10", "resnet9", {"data_dir": str(cifar_dir), "width": 2, "augment": False}, CPU).model
    assert torch.equal(plain(x), plain(x))


def test_cifar10_same_seed_gives_identical_losses(cifar_dir: Path) -> None:
    # Augmentation draws from the seeded torch generator: a trial is reproducible.
    options = {"data_dir": str(cifar_dir), "width": 2, "train_batches": 1}
    _, a = run("cifar10", "resnet9", options, max_steps=5, eval_every=5, sharpness=False, seed=7)
    _, b = run("cifar10", "resnet9", options, max_steps=5, eval_every=5, sharpness=False, seed=7)
    assert a == b


def test_random_crop_and_flip_work_on_whole_batches() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4) + 1
    assert torch.equal(random_crop(x, 0), x)
    torch.manual_seed(0)
    crops = random_crop(x, 2)
    assert crops.shape == x.shape
    # Each crop is a 4×4 window, the same one for all channels, of its own zero-padded image.
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, r : r + 4, c : c + 4] for r in range(5) for c in range(5)]
        assert any(torch.equal(crops[i], w) for w in windows)
    flips = torch.stack([random_flip(x) for _ in range(20)])
    # Each image is either itself or its mirror, and both happen.
    same = (flips == x).flatten(2).all(-1)
    mirrored = (flips == x.flip(3)).flatten(2).all(-1)
    assert bool((same | mirrored).all()) and bool(same.any()) and bool(mirrored.any())


def test_charlm_loss_falls_and_reports_perplexity(text_file: Path) -> None:
    result, losses = run("charlm", "transformer", charlm_options(text_file), optimizer="adamw", lr=3e-3, batch_size=16)
    assert result.status == "ok"
    assert fell(losses)
    assert result.resolved["tokens_per_batch"] == 16 * 16
    assert result.final["final/val_ppl"] == pytest.approx(math.exp(result.final["final/val_loss"]))
    assert 0.0 <= result.final["final/val_acc"] <= 1.0  # per token


def test_charlm_windows_are_next_character_pairs(text_file: Path) -> None:
    task = build_task("charlm", "transformer", charlm_options(text_file), CPU)
    assert task.tokens_per_example == 16 and tuple(task.train_x.shape[1:]) == (16,)
    # y is x shifted by one character, and window i+1 starts where window i's x ends.
    assert torch.equal(task.train_x[0, 1:], task.train_y[0, :-1])
    assert torch.equal(task.train_y[0, -1], task.train_x[1, 0])
    # The whole text is one tensor: x and y are views of it.
    assert task.train_x.untyped_storage().data_ptr() == task.val_y.untyped_storage().data_ptr()
    count = RECIPES["charlm"].num_train
    assert count is not None and task.num_train == count(CharLMOptions(text_file=str(text_file), seq_len=16))


def test_charlm_attention_is_causal() -> None:
    torch.manual_seed(0)
    attn = CausalSelfAttention(8, 2)
    x = torch.randn(1, 6, 8)
    changed = x.clone()
    changed[0, 4:] += 1.0  # only the future of position 3
    assert torch.allclose(attn(x)[0, :4], attn(changed)[0, :4], atol=1e-6)
    assert not torch.allclose(attn(x)[0, 4:], attn(changed)[0, 4:])


def test_charlm_target_on_perplexity_counts_from_above(text_file: Path) -> None:
    # Lower perplexity is better: a target of 1e6 holds already at initialization (0 steps).
    assert target_reached("val/ppl", 5.0, 6.0) and not target_reached("val/ppl", 7.0, 6.0)
    result, _ = run(
        "charlm",
        "transformer",
        charlm_options(text_file),
        optimizer="adamw",
        lr=3e-3,
        max_steps=10,
        eval_every=5,
        target_metric="val/ppl",
        target_value=1e6,
        sharpness=False,
    )
    assert result.final["final/steps_to_target"] == 0
    assert "val/ppl" in RECIPES["charlm"].metrics


# ---- bad options and missing files --------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "model", "options", "message"),
    [
        ("digits", "cnn", {"norm": "layer"}, "norm"),
        ("digits", "cnn", {"norm": "group", "channels": 6, "groups": 4}, "groups must divide channels"),
        ("digits", "cnn", {"chanels": 8}, "chanels"),
        ("cifar10", "resnet9", {}, "data_dir"),
        ("cifar10", "resnet9", {"data_dir": ".", "train_batches": 6}, "train_batches"),
        ("cifar10", "resnet9", {"data_dir": ".", "width": "wide"}, "width"),
        ("charlm", "transformer", {}, "text_file"),
        ("charlm", "transformer", {"text_file": "x", "d_model": 30, "n_heads": 4}, "n_heads must divide d_model"),
    ],
)
def test_bad_options_name_the_field(recipe: str, model: str, options: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        build_task(recipe, model, options, CPU)


def test_cifar10_missing_folder_and_file_are_named(tmp_path: Path, cifar_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"data_dir=.*nowhere.* is not a folder"):
        build_task("cifar10", "resnet9", {"data_dir": str(tmp_path / "nowhere")}, CPU)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "data_batch_1").write_bytes((cifar_dir / "data_batch_1").read_bytes())
    with pytest.raises(ValueError, match=r"data_dir=.* has no file 'test_batch'"):
        build_task("cifar10", "resnet9", {"data_dir": str(partial), "train_batches": 1}, CPU)
    with pytest.raises(ValueError, match="has no file 'data_batch_2'"):
        build_task("cifar10", "resnet9", {"data_dir": str(partial)}, CPU)


def test_cifar10_file_of_the_wrong_kind_is_refused(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path, n_per_batch=4)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), dtype=np.uint8), b"labels": [0, 1, 2, 3]}, f)
    with pytest.raises(ValueError, match=r"test_batch has data of shape \(4, 100\)"):
        load_cifar10(tmp_path, train_batches=1)


def test_charlm_missing_or_short_text_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"text_file=.*missing.txt.* does not exist"):
        build_task("charlm", "transformer", {"text_file": str(tmp_path / "missing.txt")}, CPU)
    short = tmp_path / "short.txt"
    short.write_text("too short for a window", encoding="utf-8")
    with pytest.raises(ValueError, match="needs at least seq_len"):
        build_task("charlm", "transformer", {"text_file": str(short), "seq_len": 16}, CPU)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café ".encode("latin-1") * 100)
    with pytest.raises(ValueError, match="not UTF-8"):
        build_task("charlm", "transformer", {"text_file": str(latin)}, CPU)


def test_unknown_model_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="resnet9"):
        build_task("cifar10", "vgg", {"data_dir": "."}, CPU)


# ---- user recipes by import path ----------------------------------------------------


@pytest.mark.parametrize("attribute", ["build", "RECIPE"])
def test_user_recipe_by_import_path_trains(attribute: str) -> None:
    result, losses = run(f"{EXAMPLE}:{attribute}", "mlp", {"dim": 8, "n_examples": 500}, max_steps=40)
    assert result.status == "ok"
    assert fell(losses)
    assert "final/val_acc" not in result.final  # a regression has no accuracy


def test_bare_build_function_takes_any_model_and_plain_dict_options() -> None:
    recipe = get_recipe(f"{EXAMPLE}:build")
    assert "anything" in recipe.models
    assert recipe.options.model_validate({"dim": 3, "whatever": [1]}).model_extra == {"dim": 3, "whatever": [1]}
    # The function itself refuses what it does not know.
    with pytest.raises(ValueError, match="unknown option 'whatever'"):
        build_task(f"{EXAMPLE}:build", "mlp", {"whatever": 1}, CPU)


def not_a_task(model: str, options: dict, device: torch.device) -> dict:
    return {"model": model}


def two_arguments(model: str, options: dict) -> Task:
    raise AssertionError("never called")


NOT_CALLABLE = 42


def _task(**kw: Any) -> Task:
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    fields: dict[str, Any] = dict(
        model=nn.Linear(4, 3),
        train_x=x[:16],
        train_y=y[:16],
        val_x=x[16:],
        val_y=y[16:],
        loss_fn=nn.functional.cross_entropy,
    )
    fields.update(kw)
    return Task(**fields)


def per_example_loss(model: str, options: dict, device: torch.device) -> Task:
    return _task(loss_fn=lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"))


def mismatched_shapes(model: str, options: dict, device: torch.device) -> Task:
    return _task(val_x=torch.randn(4, 5))


def on_another_device(model: str, options: dict, device: torch.device) -> Task:
    return _task(val_y=torch.zeros(4, dtype=torch.long, device="meta"))


def outputs_without_classes(model: str, options: dict, device: torch.device) -> Task:
    return _task(model=nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)), loss_fn=lambda out, y: (out - y).pow(2).mean())


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("no_such_package.recipes:build", r"cannot import module 'no_such_package.recipes'.*PYTHONPATH"),
        (f"{EXAMPLE}:missing", r"has no attribute 'missing'"),
        (f"{HERE}:NOT_CALLABLE", r"'NOT_CALLABLE' is not callable \(its type is int\)"),
        (f"{HERE}:two_arguments", r"must accept \(model, options, device\)"),
        (f"{HERE}:", r"write a user recipe as 'package.module:build'"),
        ("nope", r"unknown recipe 'nope'; choose one of: charlm, cifar10, digits, mnist1d"),
    ],
)
def test_broken_user_recipe_is_named_with_what_to_fix(recipe: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        get_recipe(recipe)
    assert recipe in str(info.value)


@pytest.mark.parametrize(
    ("builder", "message"),
    [
        ("not_a_task", r"returned a dict, not a trainers.task.Task"),
        ("per_example_loss", r"loss_fn must return the mean loss as a 0-dim tensor, got \(2,\)"),
        ("mismatched_shapes", r"train_x has examples of shape \(4,\) but Task.val_x has \(5,\)"),
        ("on_another_device", r"Task.val_y is on meta, not on the training device cpu"),
        ("outputs_without_classes", r"classification=True .* outputs \(2,\)"),
    ],
)
def test_task_a_user_recipe_returns_is_checked(builder: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        build_task(f"{HERE}:{builder}", "m", {}, CPU)
    assert f"{HERE}:{builder}" in str(info.value)


def test_builtin_recipes_are_registered() -> None:
    assert {"mnist1d", "digits", "cifar10", "charlm"} <= set(RECIPES)
