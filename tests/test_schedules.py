"""Divergence schedules: factors at hand-computed steps, the end-of-schedule value, errors."""

import pytest
import torch

from vae_cli.errors import UserError
from vae_cli.objective.schedules import Capacity, Constant, Cyclical, Linear, Logistic


def test_constant_is_one_everywhere():
    s = Constant()
    assert [s.factor(t) for t in (0, 1, 10**6, None)] == [1.0] * 4


@pytest.mark.parametrize(("step", "expected"), [
    (0, 0.0), (25, 0.25), (50, 0.5), (99, 0.99), (100, 1.0), (10**6, 1.0), (None, 1.0)])
def test_linear_warmup_from_zero(step, expected):
    assert Linear(warmup_steps=100).factor(step) == pytest.approx(expected)


@pytest.mark.parametrize(("step", "expected"), [
    # start + (1 - start) * step / warmup with start 0.2, warmup 40
    (0, 0.2), (10, 0.4), (20, 0.6), (40, 1.0), (41, 1.0), (None, 1.0)])
def test_linear_warmup_from_start(step, expected):
    assert Linear(warmup_steps=40, start=0.2).factor(step) == pytest.approx(expected)


@pytest.mark.parametrize(("step", "expected"), [
    # cycles of 100 steps, rising over the first 50 (ramp 0.5), then holding at 1
    (0, 0.0), (10, 0.2), (25, 0.5), (49, 0.98), (50, 1.0), (99, 1.0),
    (100, 0.0), (120, 0.4), (175, 1.0),
    (250, 1.0), (299, 1.0),
    # after 3 cycles: beta for good, never back to 0
    (300, 1.0), (310, 1.0), (10**6, 1.0), (None, 1.0)])
def test_cyclical(step, expected):
    assert Cyclical(cycle_steps=100, cycles=3, ramp=0.5).factor(step) == pytest.approx(expected)


def test_cyclical_full_ramp_rises_over_the_whole_cycle():
    s = Cyclical(cycle_steps=10, cycles=2, ramp=1.0)
    assert [s.factor(t) for t in (0, 5, 9, 10, 15)] == pytest.approx([0, 0.5, 0.9, 0, 0.5])


@pytest.mark.parametrize(("step", "expected"), [
    # 1 / (1 + exp(-k (step - x0))) with k 0.01, x0 300: e^-3, e^0, e^3 at steps 0, 300, 600
    (0, 1 / (1 + 2.718281828**3)), (300, 0.5), (600, 1 / (1 + 2.718281828**-3)), (None, 1.0)])
def test_logistic_is_half_at_its_midpoint(step, expected):
    assert Logistic(k=0.01, midpoint=300).factor(step) == pytest.approx(expected)


@pytest.mark.parametrize(("schedule", "first"), [
    (Constant(), 0), (Linear(warmup_steps=40), 40), (Cyclical(10, 3), 25),
    (Capacity(steps=70), 70), (Logistic(k=0.01, midpoint=300), 991)])
def test_settles_at_the_first_step_of_the_final_weight(schedule, first):
    final = schedule.term(torch.tensor(5.0), 1.0, None).item()
    near = 1e-3 * 5.0 if isinstance(schedule, Logistic) else 1e-9
    assert schedule.settles_at == first
    assert all(abs(schedule.term(torch.tensor(5.0), 1.0, t).item() - final) <= near
               for t in (first, first + 1, first + 1000))
    if first:  # and not a step earlier
        assert abs(schedule.term(torch.tensor(5.0), 1.0, first - 1).item() - final) > near


@pytest.mark.parametrize(("schedule", "step", "factor"), [
    (Constant(), 7, 1.0), (Linear(warmup_steps=10), 4, 0.4), (Cyclical(10, 2, 0.5), 12, 0.4)])
def test_term_is_weight_times_factor_times_div(schedule, step, factor):
    div = torch.tensor(3.0, requires_grad=True)
    term = schedule.term(div, 2.5, step)
    assert term.item() == pytest.approx(2.5 * factor * 3.0)
    term.backward()
    assert div.grad.item() == pytest.approx(2.5 * factor)


@pytest.mark.parametrize(("step", "c"), [(0, 0.0), (250, 5.0), (500, 10.0), (1000, 20.0),
                                         (5000, 20.0), (None, 20.0)])
def test_capacity_target_rises_linearly_then_holds(step, c):
    assert Capacity(c_max=20.0, steps=1000).capacity(step) == pytest.approx(c)


@pytest.mark.parametrize(("div", "step", "expected"), [
    # gamma * weight * |div - C(step)| with gamma 100, weight 0.5, C(250) = 5
    (8.0, 250, 100 * 0.5 * 3.0),
    (2.0, 250, 100 * 0.5 * 3.0),  # below the target costs as much as above it
    (5.0, 250, 0.0),
    (26.0, None, 100 * 0.5 * 6.0),  # end of schedule: C = c_max
])
def test_capacity_term(div, step, expected):
    s = Capacity(c_max=20.0, steps=1000, gamma=100.0)
    assert s.term(torch.tensor(div), 0.5, step).item() == pytest.approx(expected)


def test_capacity_gradient_pushes_div_towards_the_target():
    s = Capacity(c_max=20.0, steps=1000, gamma=10.0)
    for value, sign in ((8.0, 1.0), (2.0, -1.0)):
        div = torch.tensor(value, requires_grad=True)
        s.term(div, 1.0, 250).backward()
        assert div.grad.item() == pytest.approx(sign * 10.0)


@pytest.mark.parametrize(("cls", "kw"), [
    (Linear, {"warmup_steps": 0}),
    (Linear, {"start": -0.1}),
    (Linear, {"start": 1.5}),
    (Cyclical, {"cycle_steps": 0}),
    (Cyclical, {"cycles": 0}),
    (Cyclical, {"ramp": 0.0}),
    (Cyclical, {"ramp": 1.5}),
    (Capacity, {"c_max": -1.0}),
    (Capacity, {"steps": 0}),
    (Capacity, {"gamma": 0.0}),
    (Logistic, {"k": 0.0}),
    (Logistic, {"midpoint": -1}),
])
def test_invalid_arguments_raise(cls, kw):
    with pytest.raises(UserError):
        cls(**kw)


@pytest.mark.parametrize(("cls", "kw"), [(Linear, {"warmup_steps": 1, "start": 1.0}),
                                         (Cyclical, {"ramp": 1.0}), (Capacity, {"c_max": 0.0})])
def test_boundary_arguments_are_accepted(cls, kw):
    cls(**kw)
