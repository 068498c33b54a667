"""The benchmarks' optional dependencies: the core library needs torch alone, the benchmarks also numpy and tqdm
(the ``bench`` extra, with matplotlib for the report's plots).

Each benchmark subpackage that needs them calls :func:`require` as it is imported, so a missing one fails there,
once, with the command that installs it, rather than deep inside a data loader.
"""

from __future__ import annotations

import importlib

INSTALL_HINT = "pip install 'taskbalance[bench]'"


def require(*modules: str, what: str) -> None:
    """Import ``modules`` now, or raise ImportError naming the missing one, ``what`` needs it, and the install hint."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ImportError(f"{what} need {name}, which is not installed: {INSTALL_HINT}") from error
