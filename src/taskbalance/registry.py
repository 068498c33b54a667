"""Method names, presets and :func:`make`.

A spec is ``"<loss>"``, ``"<gradient>"`` or ``"<loss>+<gradient>"``, optionally followed by keyword options in
brackets, routed as :func:`make`'s keywords are: ``"nashmtl[update_weights_every=10]"``,
``"igbv1+cagrad[c=0.5,max_norm=1.0]"``. Each value is read by the type its method declares for it
(:mod:`taskbalance.spec_options`: ``log_losses=false`` is False, ``c=abc`` is refused). A bare gradient name runs with
EW at the loss level unless a preset says otherwise (``dbmtl`` = ``si+dbmtl``). The tables below are the one place that
maps a paper's name to its module: ``loss_balancing/<module>.py`` or ``gradient_balancing/<module>.py``.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .balancer import Balancer
from .gradient_balancing.base import GradientBalancer
from .loss_balancing.base import LossBalancer
from .spec_options import parameter_types, read_option, split_top_level

#: loss-level methods: name -> "module:Class" under taskbalance.loss_balancing
LOSS_METHODS: dict[str, str] = {
    "ew": "equal:Equal",
    "si": "scale_invariant:ScaleInvariant",
    "uw": "uw:UW",
    "dwa": "dwa:DWA",
    "rlw": "rlw:RLW",
    "gls": "gls:GLS",
    "imtl_l": "imtl_l:IMTLL",
    "famo": "famo:FAMO",
    "stch": "stch:STCH",
    "igbv1": "igbv1:IGBv1",
    "igbv2": "igbv2:IGBv2",
}

#: gradient-level methods: name -> "module:Class" under taskbalance.gradient_balancing
GRADIENT_METHODS: dict[str, str] = {
    "sum": "sum:Sum",
    "mgda": "mgda:MGDA",
    "pcgrad": "pcgrad:PCGrad",
    "cagrad": "cagrad:CAGrad",
    "graddrop": "graddrop:GradDrop",
    "gradvac": "gradvac:GradVac",
    "imtl_g": "imtl_g:IMTLG",
    "nashmtl": "nash_mtl:NashMTL",
    "aligned_mtl": "aligned_mtl:AlignedMTL",
    "upgrad": "upgrad:UPGrad",
    "fairgrad": "fairgrad:FairGrad",
    "moco": "moco:MoCo",
    "config": "con_fig:ConFIG",
    "gradnorm": "gradnorm:GradNorm",
    "dbmtl": "dbmtl:DBMTL",
    "imgrad": "imgrad:IMGrad",
}


@dataclass(frozen=True)
class Preset:
    """A name that stands for a configured method (an option set, not a copy of the code)."""

    base: str
    options: dict[str, Any] = field(default_factory=dict)
    #: for a gradient method used bare: the loss method it runs with (default EW) and its options
    loss: str = "ew"
    loss_options: dict[str, Any] = field(default_factory=dict)
    #: Balancer options (e.g. the engine path)
    balancer: dict[str, Any] = field(default_factory=dict)


#: the IGB paper's "+SI" variants: the method applied to log losses
LOSS_PRESETS: dict[str, Preset] = {
    "uw_si": Preset("uw", {"log_losses": True}),
    "rlw_si": Preset("rlw", {"log_losses": True}),
    "dwa_si": Preset("dwa", {"log_losses": True}),
}

GRADIENT_PRESETS: dict[str, Preset] = {
    # DB-MTL = log(L + 1e-8) losses + max-norm EMA gradient balancing (Lin et al.; ε as in LibMTL)
    "dbmtl": Preset("dbmtl", loss="si", loss_options={"eps": 1e-8}),
    # the "upper bound" variants: the same method on the gradients of the shared representation (an approximation)
    "mgda_ub": Preset("mgda", balancer={"engine": "representation"}),
    "aligned_mtl_ub": Preset("aligned_mtl", balancer={"engine": "representation"}),
}


def available() -> list[str]:
    """Every name :func:`make` accepts as a single method (combine with ``+``)."""
    return sorted({*LOSS_METHODS, *GRADIENT_METHODS, *LOSS_PRESETS, *GRADIENT_PRESETS})


def _load(table: dict[str, str], package: str, name: str) -> type[Any]:
    module_name, class_name = table[name].split(":")
    module = importlib.import_module(f"taskbalance.{package}.{module_name}")
    cls: type[Any] = getattr(module, class_name)
    return cls


def loss_class(name: str) -> type[LossBalancer]:
    """The class registered under a loss-level ``name``."""
    return _load(LOSS_METHODS, "loss_balancing", name)


def gradient_class(name: str) -> type[GradientBalancer]:
    """The class registered under a gradient-level ``name``."""
    return _load(GRADIENT_METHODS, "gradient_balancing", name)


#: the Balancer's options that a spec or a keyword of :func:`make` may set
BALANCER_OPTIONS = frozenset({"engine", "check_finite", "update_weights_every", "distributed", "group"})


def _accepts(init: Any) -> set[str]:
    params = inspect.signature(init).parameters
    return {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown method {name!r}; available: {', '.join(available())}")


_WITH_OPTIONS = re.compile(r"^(?P<spec>[^\[\]]*?)\s*\[(?P<options>[^\[\]]*)\]\s*$")


def split_options(spec: str) -> tuple[str, dict[str, str]]:
    """``"name[k=v,...]"`` → (``"name"``, {k: "v"}): the values as written, read by type in :func:`make`."""
    match = _WITH_OPTIONS.match(spec)
    if match is None:
        if "[" in spec or "]" in spec:
            raise ValueError(
                f"options go in one pair of brackets at the end of a spec, e.g. 'cagrad[c=0.5]'; got {spec!r}"
            )
        return spec, {}
    options: dict[str, str] = {}
    for part in split_top_level(match["options"]):
        key, sep, text = part.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"spec options are key=value pairs, got {part!r} in {spec!r}")
        if key.strip() in options:
            raise ValueError(f"option {key.strip()!r} is given twice in {spec!r}")
        options[key.strip()] = text.strip()
    return match["spec"], options


def split_specs(text: str) -> list[str]:
    """A comma-separated list of specs, where commas inside a spec's brackets do not separate."""
    return split_top_level(text)


def _parse(spec: str) -> tuple[str, dict[str, Any], str, dict[str, Any], dict[str, Any]]:
    """(loss name, loss options, gradient name, gradient options, balancer options) preset by a spec."""
    parts = [p.strip().lower() for p in spec.split("+")]
    if len(parts) > 2 or not all(parts):
        raise ValueError(f"a spec is '<loss>', '<gradient>' or '<loss>+<gradient>', got {spec!r}")
    loss_spec, grad_spec = (parts[0], "sum") if len(parts) == 1 else (parts[0], parts[1])
    if len(parts) == 1 and loss_spec not in LOSS_METHODS and loss_spec not in LOSS_PRESETS:
        if loss_spec not in GRADIENT_METHODS and loss_spec not in GRADIENT_PRESETS:
            raise _unknown(loss_spec)
        grad_spec = loss_spec
        bare = GRADIENT_PRESETS.get(grad_spec)
        loss_spec = bare.loss if bare else "ew"
    else:
        bare = None
    loss_preset = LOSS_PRESETS.get(loss_spec)
    loss_name = loss_preset.base if loss_preset else loss_spec
    grad_preset = GRADIENT_PRESETS.get(grad_spec)
    grad_name = grad_preset.base if grad_preset else grad_spec
    if loss_name not in LOSS_METHODS:
        if loss_name in GRADIENT_METHODS:
            raise ValueError(f"{loss_spec!r} is a gradient-level method; write it after '+': 'ew+{loss_spec}'")
        raise _unknown(loss_spec)
    if grad_name not in GRADIENT_METHODS:
        if grad_name in LOSS_METHODS:
            raise ValueError(f"{grad_spec!r} is a loss-level method; write it before '+'")
        raise _unknown(grad_spec)
    loss_options = dict(loss_preset.options) if loss_preset else {}
    if bare is not None:
        loss_options.update(bare.loss_options)
    grad_options = dict(grad_preset.options) if grad_preset else {}
    balancer_options = dict(grad_preset.balancer) if grad_preset else {}
    return loss_name, loss_options, grad_name, grad_options, balancer_options


def _owners(loss_name: str, grad_name: str) -> dict[str, tuple[Callable[..., Any], str, set[str] | frozenset[str]]]:
    """Who takes an option of this spec, by level: (constructor, name for messages, accepted option names)."""
    loss_init, grad_init = loss_class(loss_name).__init__, gradient_class(grad_name).__init__
    return {
        "loss": (loss_init, loss_name, _accepts(loss_init)),
        "gradient": (grad_init, grad_name, _accepts(grad_init)),
        "balancer": (Balancer.__init__, "Balancer", BALANCER_OPTIONS),
    }


def _level(key: str, spec: str, owners: dict[str, tuple[Callable[..., Any], str, set[str] | frozenset[str]]]) -> str:
    """The one level that accepts option ``key`` (TypeError when none or several do)."""
    levels = [level for level, (_, _, accepted) in owners.items() if key in accepted]
    if not levels:
        names = sorted(set().union(*(accepted for _, _, accepted in owners.values())))
        raise TypeError(f"option {key!r} is not accepted by {spec!r}; accepted: {', '.join(names)}")
    if len(levels) > 1:
        raise TypeError(
            f"option {key!r} is ambiguous in {spec!r} (accepted by {' and '.join(levels)}); "
            "pass it in loss_options= or gradient_options="
        )
    return levels[0]


def spec_engine(spec: str) -> str | None:
    """The engine path ``spec`` names, by an option or its preset (``"mgda_ub"``: ``"representation"``); None when
    it leaves the engine to the Balancer's default."""
    names, written = read_spec(spec)
    engine = written.get("engine", _parse(names)[4].get("engine"))
    return None if engine is None else str(engine)


def read_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """The spec without its options, and the options written in it, each read by the type its owner declares
    (``"CAGrad[c=0.5]"`` → (``"CAGrad"``, {"c": 0.5})). Raises what :func:`make` raises for a bad option."""
    names, written = split_options(spec)
    loss_name, _, grad_name, _, _ = _parse(names)
    owners = _owners(loss_name, grad_name)
    typed = {}
    for key, text in written.items():
        init, owner, _ = owners[_level(key, names, owners)]
        typed[key] = read_option(text, parameter_types(init).get(key, Any), option=key, owner=owner)
    return names, typed


def make(
    spec: str,
    n_tasks: int,
    *,
    loss_options: dict[str, Any] | None = None,
    gradient_options: dict[str, Any] | None = None,
    **options: Any,
) -> Balancer:
    """Build a :class:`Balancer` from a spec such as ``"igbv1+nashmtl"``, ``"dbmtl"`` or ``"uw"``.

    Each keyword option goes to whichever of the loss method, the gradient method or the Balancer accepts it
    (e.g. ``max_norm`` to Nash-MTL, ``base_epoch`` to IGBv1, ``engine`` to the Balancer). An option accepted by
    more than one (FAMO's and MoCo's ``gamma``) is an error: pass it in ``loss_options`` / ``gradient_options``.
    A keyword overrides the same option written in the spec.
    """
    names, written = read_spec(spec)
    loss_name, preset_loss, grad_name, preset_grad, balancer_options = _parse(names)
    owners = _owners(loss_name, grad_name)
    targets = {
        "loss": {**preset_loss, **(loss_options or {})},
        "gradient": {**preset_grad, **(gradient_options or {})},
        "balancer": balancer_options,
    }
    for key, value in {**written, **options}.items():
        targets[_level(key, names, owners)][key] = value
    return Balancer(
        loss=loss_class(loss_name)(**targets["loss"]),
        gradient=gradient_class(grad_name)(**targets["gradient"]),
        n_tasks=n_tasks,
        **targets["balancer"],
    )
