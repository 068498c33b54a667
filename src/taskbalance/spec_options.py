"""Options written inside a spec string (``"cagrad[c=0.5,max_norm=none]"``), read by the type they are declared with.

A spec's options arrive as text. Guessing their type from the text alone (a Python literal, else a string) made
``"uw[log_losses=false]"`` the non-empty string ``"false"``, which is true, and let ``"cagrad[c=abc]"`` reach the
method as a string. Instead each value is read by the annotation of the constructor parameter it goes to:

- ``bool``: ``true``/``false``, ``yes``/``no``, ``on``/``off``, ``1``/``0`` (any case);
- ``int``, ``float``: Python's own parsing (an int where an int is declared: ``2.5`` is refused);
- ``X | None``: ``none`` or ``null`` (any case) for None, else read as X;
- ``Literal["a", "b"]``: one of the listed words;
- ``Sequence[X]``: ``(x1, x2, ...)``, each read as X;
- ``str``: the text as written.

Words (``Literal`` and ``str`` values) may also be quoted, ``normalization='l2'``, as in Python.

A value that does not read as its type raises one ``ValueError`` naming the option, the method and the type.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null"}


class OptionError(ValueError):
    """A spec option whose text does not read as the type its method declares."""


def split_top_level(text: str, separator: str = ",") -> list[str]:
    """``text`` split at ``separator`` outside brackets and parentheses, each part stripped, empty parts dropped."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += (char in "[(") - (char in "])")
        if char == separator and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    return [p for p in parts if p]


def parameter_types(function: Callable[..., Any]) -> dict[str, Any]:
    """The resolved annotations of ``function``'s parameters (``return`` left out)."""
    hints = typing.get_type_hints(function)
    hints.pop("return", None)
    return hints


def read_option(text: str, annotation: Any, *, option: str, owner: str) -> Any:
    """``text`` read as a value of ``annotation`` (see the module docstring); ``OptionError`` if it is not one."""
    try:
        return _read(text.strip(), annotation)
    except _Mismatch as mismatch:
        raise OptionError(f"option {option}={text.strip()!r} of {owner}: expected {mismatch.expected}") from None


class _Mismatch(Exception):
    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def _read(text: str, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return _read_union(text, args)
    if origin is typing.Literal:
        if _unquoted(text) in args:
            return _unquoted(text)
        raise _Mismatch("one of " + ", ".join(repr(a) for a in args))
    if origin in (Sequence, list, tuple) or annotation in (list, tuple):
        return _read_sequence(text, args[0] if args else Any)
    if annotation is bool:
        return _read_bool(text)
    if annotation in (int, float):
        return _read_number(text, annotation)
    if annotation is str or annotation is Any:
        return _unquoted(text)
    raise _Mismatch(f"a value of type {annotation!r}, which a spec cannot express; pass it as a keyword instead")


def _read_union(text: str, arms: tuple[Any, ...]) -> Any:
    if type(None) in arms and text.lower() in _NONE:
        return None
    expected = []
    for arm in arms:
        if arm is type(None):
            expected.append("none")
            continue
        try:
            return _read(text, arm)
        except _Mismatch as mismatch:
            expected.append(mismatch.expected)
    raise _Mismatch(" or ".join(expected))


def _unquoted(text: str) -> str:
    """``'word'`` or ``"word"`` → ``word``; anything else as it is."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _read_bool(text: str) -> bool:
    word = text.lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise _Mismatch("a boolean (true/false, yes/no, on/off, 1/0)")


def _read_number(text: str, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise _Mismatch("an integer" if kind is int else "a number") from None


def _read_sequence(text: str, item: Any) -> tuple[Any, ...]:
    if not (text.startswith("(") and text.endswith(")")):
        raise _Mismatch("a sequence written in parentheses, e.g. (1.0, 2.0)")
    return tuple(_read(part, item) for part in split_top_level(text[1:-1]))
