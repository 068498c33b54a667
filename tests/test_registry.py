"""tb.make / tb.available: every registered name builds, specs parse, errors list what is available."""

from __future__ import annotations

import pytest
import torch

import taskbalance as tb
from taskbalance import registry
from taskbalance.cli import main
from taskbalance.registry import split_specs
from tests.models import TinyMTL, make_data, task_losses


@pytest.mark.parametrize("name", tb.available())
def test_every_name_builds_and_backpropagates(name: str) -> None:
    balancer = tb.make(name, n_tasks=3)
    assert isinstance(balancer, tb.Balancer)
    assert repr(balancer)
    model = TinyMTL()
    x, y = make_data()
    features, losses = task_losses(model, x, y)
    result = balancer.backward(losses, model.encoder.parameters(), features=features)
    assert result.weights.shape == (3,)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.encoder.parameters())


@pytest.mark.parametrize(
    ("spec", "loss", "gradient"),
    [
        ("ew", "Equal", "Sum"),
        ("igbv1+sum", "IGBv1", "Sum"),
        ("IGBv1 + NashMTL", "IGBv1", "NashMTL"),
        ("nashmtl", "Equal", "NashMTL"),
        ("dbmtl", "ScaleInvariant", "DBMTL"),
        ("igbv1+dbmtl", "IGBv1", "DBMTL"),
        ("uw_si", "UW", "Sum"),
        ("rlw_si+cagrad", "RLW", "CAGrad"),
    ],
)
def test_specs_parse(spec: str, loss: str, gradient: str) -> None:
    balancer = tb.make(spec, n_tasks=2)
    assert type(balancer.loss).__name__ == loss
    assert type(balancer.gradient).__name__ == gradient


def test_presets_are_options_not_copies() -> None:
    balancer = tb.make("uw_si", n_tasks=2)
    assert type(balancer.loss) is registry.loss_class("uw")
    assert balancer.loss.takes_log


def test_options_are_routed() -> None:
    balancer = tb.make("igbv1+nashmtl", n_tasks=3, max_norm=2.0, base_epoch=2, engine="loop")
    assert balancer.gradient.max_norm == 2.0
    assert balancer.engine == "loop"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nosuch", "unknown method 'nosuch'; available: .*igbv1"),
        ("ew+nosuch", "unknown method 'nosuch'"),
        ("nashmtl+ew", "gradient-level method"),
        ("ew+igbv1", "loss-level method"),
        ("a+b+c", "a spec is"),
        ("ew+", "a spec is"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tb.make(spec, n_tasks=2)


def test_unknown_option_lists_accepted() -> None:
    with pytest.raises(TypeError, match=r"option .bogus. is not accepted.*engine"):
        tb.make("ew", n_tasks=2, bogus=1)


def test_paper_names_are_attributes() -> None:
    assert tb.IGBv1 is registry.loss_class("igbv1")
    assert tb.NashMTL is registry.gradient_class("nashmtl")
    with pytest.raises(AttributeError):
        _ = tb.NoSuchMethod


def test_cli_lists_methods(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in tb.available():
        assert name in out


def test_ambiguous_option_needs_explicit_level() -> None:
    with pytest.raises(TypeError, match=r"ambiguous.*loss_options"):
        tb.make("famo+moco", n_tasks=2, gamma=0.5)
    balancer = tb.make("famo+moco", n_tasks=2, loss_options={"gamma": 0.5}, gradient_options={"gamma": 0.2})
    assert balancer.loss.gamma == 0.5
    assert balancer.gradient.gamma == 0.2


def test_dbmtl_preset_uses_libmtl_epsilon() -> None:
    """DB-MTL's loss half is log(L + 1e-8) (Lin et al.; LibMTL), not the exact log of plain SI."""
    balanced = tb.make("dbmtl", n_tasks=2).loss(torch.tensor([1e-8, 1.0]))
    torch.testing.assert_close(balanced.losses, torch.log(torch.tensor([2e-8, 1.0 + 1e-8])))


def test_upper_bound_presets_run_on_the_representation() -> None:
    balancer = tb.make("mgda_ub", n_tasks=3)
    assert type(balancer.gradient).__name__ == "MGDA"
    assert balancer.engine == "representation"
    model = TinyMTL()
    x, y = make_data()
    _, losses = task_losses(model, x, y)
    with pytest.raises(ValueError, match="features"):
        balancer.backward(losses, model.encoder.parameters())


def test_gramian_engine_refuses_jacobian_methods_at_construction() -> None:
    with pytest.raises(ValueError, match="reads J"):
        tb.make("dbmtl", n_tasks=2, engine="gramian")


def test_spec_options_in_brackets() -> None:
    balancer = tb.make("igbv1+cagrad[c=0.25, max_norm=None, update_weights_every=3]", n_tasks=2)
    assert balancer.gradient.c == 0.25 and balancer.gradient.max_norm is None  # type: ignore[union-attr]
    assert balancer.update_weights_every == 3
    assert tb.make("nashmtl[optim_niter=7]", n_tasks=2, optim_niter=9).gradient.optim_niter == 9  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="key=value"):
        tb.make("cagrad[0.5]", n_tasks=2)
    with pytest.raises(ValueError, match="one pair of brackets"):
        tb.make("cagrad[c=0.5]+mgda", n_tasks=2)
    with pytest.raises(TypeError, match="not accepted"):
        tb.make("mgda[c=0.5]", n_tasks=2)


def test_split_specs_keeps_bracketed_commas() -> None:
    assert split_specs("ew, cagrad[c=0.5,max_norm=1.0],igbv1+nashmtl") == [
        "ew",
        "cagrad[c=0.5,max_norm=1.0]",
        "igbv1+nashmtl",
    ]
