"""The base of every method: options and state declared once, everything about saving and checking derived.

A class lists its constructor options (``options``, attribute names) and the attributes that hold its history
(``state``, built with :func:`fields`). From that one declaration :class:`Declared` derives ``extra_repr``,
``get_extra_state``/``set_extra_state`` (each field saved by its type) and the check that a saved state belongs
here: same class, same options (and for a :class:`Method` the same number of tasks), else one ValueError that
names the difference, raised before any parameter, buffer or field of the module is assigned. Parameters and
registered buffers stay ordinary module state. Declarations add up along the class hierarchy: a subclass lists
only its own.

An option that is also a state field (a ``seed``) is shown by repr but restored from the saved state instead
of checked: a run resumed in an object built with another seed continues the saved run.

:func:`atomic` runs a block as a transaction on a module's ``state_dict()``: ``load_state_dict`` of a
:class:`Declared` (and of the Balancer, and each Balancer step) restores the state exactly when it raises, wherever
the refusal came from (a nested object's check, a missing key, a tensor of the wrong shape).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from enum import Enum
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

#: torch's key for a module's extra state inside ``state_dict()``
_EXTRA_STATE = "_extra_state"
#: keys of the saved extra state that are not fields: the class name and the options it was saved with
_CLASS, _OPTIONS = "method", "options"


class _Initial(Enum):
    """The initial value of a field that the class sets itself (a generator, a tensor of K entries, an object)."""

    OWN = "set by the class"


class _Unset:
    """Stands for an option a saved state does not have, in the refusal message."""

    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()
_IMMUTABLE = (type(None), bool, int, float, str)


def fields(*own: str, **initial: object) -> Mapping[str, object]:
    """A ``state`` declaration: every name is saved in ``state_dict()`` and restored by ``load_state_dict()``.

    ``own`` fields are initialised by the class itself (reseeded generators, tensors of K entries, nested
    objects); each keyword field is set to its (immutable) value at construction and by :meth:`Method.reset`.
    """
    both = set(own) & set(initial)
    if both:
        raise TypeError(f"state field(s) {sorted(both)} given both with and without an initial value")
    for name, value in initial.items():
        if not isinstance(value, _IMMUTABLE):
            raise TypeError(f"the initial value of {name!r} must be None, a bool, a number or a string")
    return MappingProxyType({**dict.fromkeys(own, _Initial.OWN), **initial})


def _key(name: str) -> str:
    """The key of a field in the saved state: its name without the leading underscore of a private attribute."""
    return name.removeprefix("_")


def _describe(cls: str, options: Mapping[str, Any]) -> str:
    return f"{cls}({', '.join(f'{name}={value!r}' for name, value in options.items())})"


#: set while :func:`snapshot` reads a state: the fields a class declares ``replaced`` are then kept by reference
_SNAPSHOT: ContextVar[bool] = ContextVar("taskbalance_snapshot", default=False)


def _save(value: Any, alias: bool = False) -> Any:
    """A field as saved: a generator's state, a nested object's state dict, a copy of a tensor (the tensor itself
    with ``alias``), else the value."""
    if isinstance(value, torch.Generator):
        return value.get_state()
    if isinstance(value, Tensor):
        return value if alias else value.clone()  # several fields are updated in place by the next step
    if callable(getattr(value, "state_dict", None)):
        return value.state_dict()
    return value


def spare_for(spare: Tensor | None, current: Tensor | None, like: Tensor) -> Tensor:
    """Memory for the next value of a ``replaced`` field: ``spare`` (its value before last) when it can take a
    tensor shaped like ``like``, else a new one.

    The spare is never the current value (a step that failed after the swap leaves the two the same once the
    transaction restores the field), nor of another shape, dtype or device.
    """
    usable = (
        spare is not None
        and spare is not current
        and spare.shape == like.shape
        and spare.dtype == like.dtype
        and spare.device == like.device
    )
    return spare if usable and spare is not None else torch.empty_like(like)


def _loads_in_place(value: Any) -> bool:
    """Whether a field's current value takes a saved state itself (and may still refuse it)."""
    return isinstance(value, torch.Generator) or callable(getattr(value, "load_state_dict", None))


def snapshot(module: nn.Module) -> dict[str, Any]:
    """A copy of ``module.state_dict()`` that nothing the module does later can change, each tensor copied once.

    Parameters and buffers come as aliases: cloned. A :class:`Declared` extra state holds its tensor fields as
    copies already (:func:`_save`) and nested objects' ``state_dict()`` (an optimizer's, live) as references:
    those are copied. The tensor fields a class declares ``replaced`` (never written in place) are kept by
    reference: DB-MTL's K × P gradient EMA would otherwise be copied on every step.
    """
    token = _SNAPSHOT.set(True)
    try:
        state = module.state_dict()
    finally:
        _SNAPSHOT.reset(token)
    saved: dict[str, Any] = {}
    for key, value in state.items():
        if key.endswith(_EXTRA_STATE) and isinstance(value, dict):
            saved[key] = {k: v if isinstance(v, Tensor) else _copied(v) for k, v in value.items()}
        else:
            saved[key] = _copied(value)
    return saved


def _copied(value: Any) -> Any:
    """A deep copy of a state value: tensors cloned, dicts, lists and tuples rebuilt, plain values shared.

    ``copy.deepcopy`` does the same at ~100 µs per tensor; IGBv2's agent alone holds about a hundred.
    """
    if isinstance(value, Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if type(value) in (dict, OrderedDict):
        return type(value)((k, _copied(v)) for k, v in value.items())
    if type(value) in (list, tuple):
        return type(value)(_copied(v) for v in value)
    if isinstance(value, (*_IMMUTABLE, bytes)):
        return value
    return copy.deepcopy(value)


@contextmanager
def atomic(module: nn.Module) -> Iterator[None]:
    """Run the block as one transaction on ``module.state_dict()``: an exception restores it exactly, then propagates.

    One mechanism for every method instead of each committing its new state only after success. Cost: a copy of
    the state per block (a few K-vectors for most methods; DB-MTL's and MoCo's K × P gradients; IGBv2's agent).
    """
    saved = snapshot(module)
    try:
        yield
    except BaseException:
        nn.Module.load_state_dict(module, saved)
        raise


class Declared(nn.Module):
    """An ``nn.Module`` whose options and state are declared; see the module docstring."""

    #: attribute names of the constructor options, shown by repr and checked on load (a subclass adds its own)
    options: ClassVar[tuple[str, ...]] = ()
    #: the fields that hold the history (see :func:`fields`; a subclass adds its own)
    state: ClassVar[Mapping[str, object]] = fields()
    #: tensor fields that a step replaces by another tensor and never writes in place once set: a transaction's
    #: snapshot (:func:`atomic`) keeps them by reference instead of copying them (``state_dict()`` still copies)
    replaced: ClassVar[tuple[str, ...]] = ()
    _all_options: ClassVar[tuple[str, ...]] = ()
    _all_state: ClassVar[Mapping[str, object]] = fields()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        all_options: list[str] = []
        all_state: dict[str, object] = {}
        for klass in reversed(cls.__mro__):
            for name in vars(klass).get("options", ()):
                if name in all_options:
                    raise TypeError(f"{cls.__name__}: option {name!r} is declared twice")
                all_options.append(name)
            for name, initial in vars(klass).get("state", {}).items():
                if name in all_state:
                    raise TypeError(f"{cls.__name__}: state field {name!r} is declared twice")
                all_state[name] = initial
        keys = [_key(name) for name in all_state]
        clashes = {key for key in keys if keys.count(key) > 1 or key in (_CLASS, _OPTIONS)}
        if clashes:
            raise TypeError(f"{cls.__name__}: state fields would be saved under the same or a reserved key {clashes}")
        cls._all_options = tuple(all_options)
        cls._all_state = MappingProxyType(all_state)

    def __init__(self) -> None:
        super().__init__()
        self._restore_initial()

    def _restore_initial(self) -> None:
        """Set every field declared with an initial value back to it."""
        for name, initial in self._all_state.items():
            if initial is not _Initial.OWN:
                setattr(self, name, initial)

    # -- identity --------------------------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        """What repr shows, in order: the options."""
        return {name: getattr(self, name) for name in self._all_options}

    def _identity(self) -> dict[str, Any]:
        """What a saved state must match: the settings, less the options restored from the state."""
        return {name: value for name, value in self._settings().items() if name not in self._all_state}

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self._settings().items())

    def _check_state(self, state: Any) -> None:
        """Raise one ValueError unless ``state`` was saved by this class, with these options, and is complete."""
        cls = type(self).__name__
        if not isinstance(state, Mapping) or _CLASS not in state or not isinstance(state.get(_OPTIONS), Mapping):
            raise ValueError(
                f"not a saved {cls} state: it does not say which method and options it is for "
                "(saved by another class, or by a version of taskbalance before states said so)"
            )
        mine, saved = self._identity(), state[_OPTIONS]
        if state[_CLASS] != cls:
            raise ValueError(f"state is for {_describe(state[_CLASS], saved)}, this is {_describe(cls, mine)}")
        differ = [name for name in {**mine, **saved} if saved.get(name, _UNSET) != mine.get(name, _UNSET)]
        if differ:
            theirs = {name: saved.get(name, _UNSET) for name in differ}
            ours = {name: mine.get(name, _UNSET) for name in differ}
            raise ValueError(f"state is for {_describe(cls, theirs)}, this is {_describe(cls, ours)}")
        keys = {_key(name) for name in self._all_state}
        missing = sorted(keys - set(state))
        unknown = sorted(set(state) - keys - {_CLASS, _OPTIONS})
        if missing or unknown:
            raise ValueError(
                f"the saved {cls} state does not match this version's fields: missing {missing}, unknown {unknown}"
            )

    # -- state -----------------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        state = {_CLASS: type(self).__name__, _OPTIONS: self._identity()}
        alias = _SNAPSHOT.get()
        state.update(
            {_key(name): _save(getattr(self, name), alias and name in self.replaced) for name in self._all_state}
        )
        return state

    def set_extra_state(self, state: Any) -> None:
        self._check_state(state)
        values = {name: state[_key(name)] for name in self._all_state}
        # first the fields that load themselves (a nested object checks its own identity), then plain assignments
        in_place = [name for name in values if _loads_in_place(getattr(self, name))]
        for name in in_place:
            current = getattr(self, name)
            if isinstance(current, torch.Generator):
                current.set_state(values[name].cpu())  # a generator state is a CPU byte tensor whatever the map
            else:
                current.load_state_dict(values[name])
        for name, value in values.items():
            if name not in in_place:
                setattr(self, name, value.clone() if isinstance(value, Tensor) else value)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, all or nothing: a state refused anywhere leaves the object as it was."""
        with atomic(self):
            return super().load_state_dict(state_dict, strict, assign)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        # torch copies parameters and buffers before it hands over the extra state: refuse a foreign state first
        key = prefix + _EXTRA_STATE
        if key in state_dict:
            self._check_state(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[no-untyped-call]


class Method(Declared):
    """The base of every loss- and gradient-balancing method: K, the lifecycle, declared options and state.

    ``n_tasks`` is given by :class:`~taskbalance.Balancer` through :meth:`setup` (or directly to the constructor
    of methods that create parameters); it leads the repr and a saved state must be for the same K.
    """

    def __init__(self) -> None:
        super().__init__()
        self.n_tasks = 0

    def setup(self, n_tasks: int) -> None:
        """Bind the method to K tasks. Called once by the Balancer; creates parameters and state."""
        if self.n_tasks not in (0, n_tasks):
            raise ValueError(f"{type(self).__name__} was set up for {self.n_tasks} tasks, not {n_tasks}")
        self.n_tasks = n_tasks
        self.reset()

    def reset(self) -> None:
        """Forget all history: fields declared with an initial value go back to it.

        A method extends this for what a declaration cannot say (reseeding a generator, tensors of K entries,
        re-initialising parameters), calling ``super().reset()`` first.
        """
        self._restore_initial()

    def _require_setup(self) -> None:
        if self.n_tasks == 0:
            raise RuntimeError(f"{type(self).__name__} is not set up: wrap it in taskbalance.Balancer")

    def _settings(self) -> dict[str, Any]:
        return {"n_tasks": self.n_tasks, **super()._settings()}
