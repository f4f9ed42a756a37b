"""The optimizer: built-ins with their settings, a user's factory, and the batch-size couplings."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from batchscope.trainers.optim import coupled_settings, grad_resetter, make_optimizer, step_function
from batchscope.trainers.plan import plan_run
from batchscope.trainers.spec import TrainSpec


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int = 5) -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    for _ in range(n):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize(
    ("name", "settings", "torch_kind", "torch_kwargs"),
    [
        ("adamw", {"beta1": 0.8, "beta2": 0.95, "eps": 1e-6, "weight_decay": 0.1}, torch.optim.AdamW,
         {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}),
        ("adam", {"beta2": 0.99, "amsgrad": True}, torch.optim.Adam, {"betas": (0.9, 0.99), "amsgrad": True}),
        ("sgd", {"momentum": 0.8, "nesterov": True, "weight_decay": 1e-3}, torch.optim.SGD,
         {"momentum": 0.8, "nesterov": True, "weight_decay": 1e-3}),
    ],
)  # fmt: skip
def test_a_builtin_with_its_settings_steps_like_torchs_own(name, settings, torch_kind, torch_kwargs) -> None:
    a, b = _model(), _model()
    ours = make_optimizer(name, a, 0.01, settings)
    theirs = torch_kind(b.parameters(), lr=0.01, **torch_kwargs)
    assert isinstance(ours, torch_kind)
    for model, opt in ((a, ours), (b, theirs)):
        _steps(model, opt)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_an_unknown_builtin_setting_is_refused_with_its_name() -> None:
    with pytest.raises(ValueError, match=r"optimizer 'sgd' has no settings \['beta2'\]"):
        make_optimizer("sgd", _model(), 0.1, {"beta2": 0.9})


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user's module with a factory that puts norms and biases in a group without weight decay."""
    (tmp_path / "my_optim.py").write_text(
        textwrap.dedent(
            """
            import torch

            def make(params, lr, weight_decay=0.0, beta2=0.999):
                decay = [p for p in params if p.ndim >= 2]
                no_decay = [p for p in params if p.ndim < 2]
                groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
                return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2))

            def not_an_optimizer(params, lr):
                return "adam"
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_optim"
    sys.modules.pop("my_optim", None)


def test_a_factory_gets_the_parameters_lr_and_its_options(factory_module: str) -> None:
    model = _model()
    opt = make_optimizer(f"{factory_module}:make", model, 0.02, {"weight_decay": 0.1, "beta2": 0.95})
    decay, no_decay = opt.param_groups
    # Its own parameter groups: the two weight matrices decay, biases and the norm's weights do not.
    assert [p.ndim for p in decay["params"]] == [2, 2] and decay["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert decay["lr"] == 0.02 and decay["betas"] == (0.9, 0.95)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_a_factory_that_returns_no_optimizer_is_refused(factory_module: str) -> None:
    with pytest.raises(ValueError, match=r"returned a str, not a torch\.optim\.Optimizer"):
        make_optimizer(f"{factory_module}:not_an_optimizer", _model(), 0.1, {})


@pytest.mark.parametrize("rule", ["none", "linear", "sqrt"])
def test_coupled_weight_decay_keeps_the_adamw_timescale(rule: str) -> None:
    # τ = B / (η λ D) (Bergsma et al. 2025): with D fixed, B / (η λ) must be the reference's at every B.
    ref, lam, base_lr = 128, 0.1, 1e-3
    taus = []
    for batch in (16, 128, 2048):
        plan = plan_run(
            TrainSpec(
                batch_size=batch, lr=base_lr, optimizer="adamw", weight_decay=lam, couple=("weight_decay",),
                lr_scaling=rule, reference_batch=ref, device="cpu", gns=False,
            )
        )  # fmt: skip
        lam_b = plan.optimizer_settings["weight_decay"]
        assert plan.resolved["effective_weight_decay"] == lam_b
        taus.append(batch / (plan.lr * lam_b))
    assert taus == pytest.approx([ref / (base_lr * lam)] * 3, rel=1e-12)


def test_coupled_betas_and_eps_follow_the_sde_rule() -> None:
    # Malladi et al. 2022: κ = B/B_ref; 1 − β = κ (1 − β_ref); ε = ε_ref / √κ.
    base = {"beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.1}
    out = coupled_settings(base, ("beta1", "beta2", "eps"), 512, 128, 1e-3, 1e-3)
    assert out["beta1"] == pytest.approx(1 - 4 * 0.1)
    assert out["beta2"] == pytest.approx(1 - 4 * 0.01)
    assert out["eps"] == pytest.approx(1e-8 / 2)
    assert out["weight_decay"] == 0.1  # not coupled here
    # Beyond the rule's range (κ ≥ 1/(1 − β)) β is held at 0, never negative.
    assert coupled_settings(base, ("beta1",), 128 * 20, 128, 1.0, 1.0)["beta1"] == 0.0
    # Smaller batches: β closer to 1, ε larger.
    small = coupled_settings(base, ("beta2", "eps"), 32, 128, 1.0, 1.0)
    assert small["beta2"] == pytest.approx(1 - 0.25 * 0.01) and small["eps"] == pytest.approx(2e-8)
    assert not math.isnan(small["beta2"])


def test_a_coupling_without_a_rule_is_refused() -> None:
    with pytest.raises(ValueError, match=r"no batch-size rule for \['momentum'\]"):
        coupled_settings({"momentum": 0.9}, ("momentum",), 64, 128, 1.0, 1.0)
    with pytest.raises(ValueError, match="couple: no batch-size rule"):
        TrainSpec(couple=("momentum",))


def test_the_grad_resetter_does_what_zero_grad_set_to_none_does() -> None:
    """Every parameter the optimizer holds loses its gradient; one it does not hold keeps it (as with zero_grad)."""
    held, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    opt = torch.optim.SGD([{"params": [held.weight]}, {"params": [held.bias], "lr": 0.5}], lr=0.1, fused=True)
    for module in (held, other):
        module(torch.randn(4, 3)).sum().backward()
    grad_resetter(opt)()
    assert held.weight.grad is None and held.bias.grad is None
    assert other.weight.grad is not None


def test_an_optimizer_with_its_own_zero_grad_keeps_it() -> None:
    calls: list[bool] = []

    class Custom(torch.optim.SGD):
        def zero_grad(self, set_to_none: bool = True) -> None:
            calls.append(set_to_none)
            super().zero_grad(set_to_none)

    grad_resetter(Custom(torch.nn.Linear(3, 2).parameters(), lr=0.1))()
    assert calls == [True]


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_the_unwrapped_step_updates_like_optimizer_step_and_keeps_hooks(kind: str) -> None:
    """Without hooks the step skips torch's profiler wrapper, with the same updates; a hook registered
    at any time (on the optimizer or globally) makes it go through the wrapper, so the hook runs."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    a, b = _model(), _model()
    wrapped, fast = (make_optimizer(kind, m, 0.05, {"weight_decay": 0.01}) for m in (a, b))
    step = step_function(fast)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    calls: list[str] = []
    for i in range(6):
        if i == 2:
            own = fast.register_step_post_hook(lambda *_: calls.append("own"))
        if i == 3:
            own.remove()
            glob = register_optimizer_step_pre_hook(lambda opt, *_: calls.append("global") if opt is fast else None)
        if i == 4:
            glob.remove()
        for model, opt, do in ((a, wrapped, wrapped.step), (b, fast, step)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            do()
    assert calls == ["own", "global"]
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_under_torch_profiler_the_step_and_reset_keep_their_ranges() -> None:
    """The fast paths skip torch's profiler ranges only while no profile is being recorded: a user
    profiling the loop with torch.profiler still sees Optimizer.step and Optimizer.zero_grad."""
    model = _model()
    opt = make_optimizer("sgd", model, 0.05, {})
    step, reset = step_function(opt), grad_resetter(opt)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        reset()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        step()
    names = {event.name for event in prof.events()}
    assert any(name.startswith("Optimizer.step#") for name in names)
    assert any(name.startswith("Optimizer.zero_grad#") for name in names)
