"""What determines a run folder's results, recorded when it is created and compared on ``--resume``.

A resume continues the same experiment or refuses. ``config.json`` holds a ``fingerprint``: the benchmark, every
field of its protocol, the epochs, the device type, the number of processes per run (``nproc``), the taskbalance
and torch versions, a digest of the data (every file under :meth:`Benchmark.data_sources`, by label, size and
SHA-256; the full list is ``data_manifest.json``) and each method's canonical spec with the method as built (every
option, defaults included). :func:`check_resume` raises one :class:`ResumeError` naming the first difference.
Methods and seeds may be added or dropped on a resume (each run is its own experiment); a method already in the
folder must be built the same way. Another taskbalance or torch version is refused, naming both: training code
and kernels change between versions, so the continued runs would not be the ones started.

A folder written before fingerprints existed is resumed when everything its config.json records matches
(benchmark, protocol name, epochs, batch size, learning rate, training size, the ``--data-dir`` as written, device
type, versions); its fingerprint is written then, so the next resume checks everything.

Hashing is paid once per file: the digests are cached by path, size and modification time
(``<cache>/file_hashes.json``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ... import __version__
from ...balancer import Balancer
from ...registry import make, read_spec, spec_engine
from ..base import Benchmark
from ..datasets.cache import atomic_open, cache_dir

FORMAT = 1
MANIFEST = "data_manifest.json"
_HASHES = "file_hashes.json"
_CHUNK = 1 << 20


class ResumeError(ValueError):
    """``--resume`` of a folder whose experiment differs from the one asked for; the message names the difference."""


# -- methods ---------------------------------------------------------------------------------------------------
def _canonical_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_canonical_value(v) for v in value) + ")"
    return str(value)


def canonical_spec(spec: str, n_tasks: int) -> str:
    """``spec`` re-printed from its parsed form: names lower case, options sorted by name, each value read by its
    declared type and printed canonically (``NashMTL[max_norm=1, update_weights_every=10]`` →
    ``nashmtl[max_norm=1.0,update_weights_every=10]``). Raises what :func:`taskbalance.make` raises."""
    make(spec, n_tasks=n_tasks)  # every check a build makes
    names, values = read_spec(spec)
    base = "+".join(part.strip().lower() for part in names.split("+"))
    if not values:
        return base
    return base + "[" + ",".join(f"{k}={_canonical_value(values[k])}" for k in sorted(values)) + "]"


def build_balancer(spec: str, n_tasks: int) -> Balancer:
    """The Balancer a run trains: ``spec`` built by :func:`taskbalance.make`, with the engine's rule
    (``engine="heuristic"``) where the spec leaves the engine to ``"auto"``. ``"auto"`` times the exact paths, which
    agree to rounding only, so a run's numbers would depend on the machine's load; a spec may still ask for
    ``[engine=auto]``."""
    if spec_engine(spec) is None:  # built once: a method seeded from the global RNG draws its seed here
        return make(spec, n_tasks=n_tasks, engine="heuristic")
    return make(spec, n_tasks=n_tasks)


def describe_method(spec: str, n_tasks: int) -> str:
    """The method as built, on one line: its classes and every option (defaults included) that a saved state must
    match; a seed drawn when none is given is restored from the checkpoint, so it is left out."""
    balancer = build_balancer(spec, n_tasks)
    parts = [f"engine={balancer.engine!r}", f"update_weights_every={balancer.update_weights_every}"]
    for part in (balancer.loss, balancer.gradient):
        options = part._identity()  # the method's own "what a saved state must match"
        parts.append(type(part).__name__ + "(" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")")
    return " ".join(parts)


# -- data ------------------------------------------------------------------------------------------------------
def _sha256(path: Path, cache: dict[str, list[Any]]) -> str:
    stat = path.stat()
    key = str(path.resolve())
    known = cache.get(key)
    if isinstance(known, list) and known[:2] == [stat.st_size, stat.st_mtime_ns]:
        return str(known[2])
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    cache[key] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
    return digest.hexdigest()


def _load_hash_cache(path: Path) -> dict[str, list[Any]]:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def data_manifest(sources: Mapping[str, Path]) -> dict[str, list[Any]]:
    """``label/relative path`` → [size, sha256] of every file under ``sources`` (a file source: its label)."""
    cache_path = cache_dir() / _HASHES
    cache = _load_hash_cache(cache_path)
    before = dict(cache)
    manifest: dict[str, list[Any]] = {}
    for label, root in sorted(sources.items()):
        if label == "data_dir" and not root.is_file() and not any(path.is_file() for path in root.rglob("*")):
            # the user's folder, checked before any run starts: one line, not a failure inside the first job
            raise FileNotFoundError(f"no data files in {root} ({label})")
        if root.is_file():
            manifest[label] = [root.stat().st_size, _sha256(root, cache)]
        elif root.is_dir():
            for directory, dirs, files in os.walk(root):
                dirs.sort()
                for name in sorted(files):
                    path = Path(directory) / name
                    if path.is_file():
                        rel = path.relative_to(root).as_posix()
                        manifest[f"{label}/{rel}"] = [path.stat().st_size, _sha256(path, cache)]
    if cache != before:
        with atomic_open(cache_path) as handle:
            handle.write(json.dumps(cache).encode())
    return manifest


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


# -- the fingerprint -------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    """The versions a result depends on (more are recorded in config.json's ``versions``)."""
    return {"taskbalance": __version__, "torch": torch.__version__}


def fingerprint(
    bench: Benchmark,
    epochs: int,
    device: torch.device,
    methods: Mapping[str, str],
    manifest: Mapping[str, Any],
    nproc: int = 1,
) -> dict[str, Any]:
    """config.json's ``fingerprint`` (``methods``: canonical spec → :func:`describe_method`; ``nproc``: the
    processes that train each method run, which draw one dropout stream each)."""
    protocol = dataclasses.asdict(bench.protocol)
    del protocol["description"]  # prose: a reworded description is the same protocol
    return {
        "format": FORMAT,
        "benchmark": bench.name,
        "protocol": protocol,
        "epochs": epochs,
        "device": device.type,
        "nproc": nproc,
        "versions": versions(),
        "data": {"files": len(manifest), "digest": manifest_digest(manifest)},
        "methods": dict(methods),
    }


def _legacy(previous: Mapping[str, Any]) -> dict[str, Any]:
    """The checkable part of a config.json written before fingerprints."""
    recorded = previous.get("versions")
    recorded = recorded if isinstance(recorded, dict) else {}
    device = str(previous.get("device", ""))
    return {
        "benchmark": previous.get("benchmark"),
        "protocol": {
            "name": previous.get("protocol"),
            "batch_size": previous.get("batch_size"),
            "lr": previous.get("lr"),
            "train_size": previous.get("train_size"),
        },
        "epochs": previous.get("epochs"),
        "device": device.split(":")[0],
        "versions": {k: recorded.get(k) for k in versions()},
        "data_dir": previous.get("data_dir"),
    }


def _short(digest: Any) -> str:
    return f"{str(digest)[:8]}…"


def _entry(entry: Any, with_size: bool) -> str:
    if not (isinstance(entry, list) and len(entry) == 2):
        return repr(entry)
    return _short(entry[1]) + (f" ({entry[0]} bytes)" if with_size else "")


def _data_difference(out_dir: Path, manifest: Mapping[str, list[Any]]) -> str:
    try:
        old = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"{MANIFEST} of the run is unreadable; data digest differs"
    if not isinstance(old, dict):
        return f"{MANIFEST} of the run is not a manifest"
    for name in sorted(set(old) | set(manifest)):
        if name not in manifest:
            return f"{name} is missing"
        if name not in old:
            return f"{name} is new"
        if old[name] != manifest[name]:
            was, now = old[name], manifest[name]
            sized = not (isinstance(was, list) and was[:1] == now[:1])
            return f"{name} sha256 {_entry(was, sized)} != {_entry(now, sized)}"
    return "the data digest differs"


def check_resume(
    out_dir: Path,
    previous: Mapping[str, Any],
    current: Mapping[str, Any],
    manifest: Mapping[str, list[Any]],
    data_dir: str | None,
) -> None:
    """Raise :class:`ResumeError` at the first difference between the folder's experiment and ``current``.

    ``previous``: the folder's config.json; ``current``: this call's :func:`fingerprint`; ``data_dir``: as given
    (compared only with a folder written before fingerprints, which recorded nothing else about the data).
    """
    stop = f"cannot resume {out_dir}"
    recorded = previous.get("fingerprint")
    legacy = recorded is None
    old = _legacy(previous) if legacy else recorded
    if not isinstance(old, dict):
        raise ResumeError(f"{stop}: config.json's fingerprint is not an object; restore it or use a new --out")
    old_versions, new_versions = old.get("versions"), current["versions"]
    if old_versions != new_versions:
        known = old_versions if isinstance(old_versions, dict) else {}
        written = " / ".join(f"{k} {v}" for k, v in known.items()) or "unknown versions"
        now = " / ".join(f"{k} {v}" for k, v in new_versions.items())
        raise ResumeError(
            f"{stop}: it was written by {written}, this is {now}; use a new --out (or the versions it was written with)"
        )
    settings: list[tuple[str, Any, Any]] = [("benchmark", old.get("benchmark"), current["benchmark"])]
    old_protocol: dict[str, Any] = old["protocol"] if isinstance(old.get("protocol"), dict) else {}
    keys = sorted(old_protocol if legacy else set(old_protocol) | set(current["protocol"]), key=lambda k: k != "name")
    for key in keys:
        label = "protocol" if key == "name" else f"protocol {key}"
        settings.append((label, old_protocol.get(key), current["protocol"].get(key)))
    settings += [("epochs", old.get("epochs"), current["epochs"]), ("device", old.get("device"), current["device"])]
    # folders written before nproc was recorded were trained by one process
    settings.append(("nproc", old.get("nproc", 1), current.get("nproc", 1)))
    if legacy:
        settings.append(("data_dir", old.get("data_dir"), data_dir))
    for name, was, now in settings:
        if was != now:
            raise ResumeError(
                f"{stop} with different settings ({name}: {was!r} → {now!r}); use the run's settings or a new --out"
            )
    if not legacy and old.get("data") != current["data"]:
        raise ResumeError(
            f"{stop}: the data differ from the run's ({_data_difference(out_dir, manifest)}); use the run's data "
            "or a new --out"
        )
    old_methods = old.get("methods", {}) if not legacy else {}
    if not isinstance(old_methods, dict):
        raise ResumeError(f"{stop}: config.json's fingerprint lists no methods; restore it or use a new --out")
    for spec, description in current["methods"].items():
        if spec in old_methods and not _same_build(str(old_methods[spec]), description):
            raise ResumeError(
                f"{stop}: method {spec} is built differently from the run's ({old_methods[spec]} → {description}); "
                "use a new --out"
            )


def _same_build(recorded: str, description: str) -> bool:
    """Whether a run's recorded method is this build. A run written before ``"auto"`` measured recorded
    ``engine='auto'`` for what is now ``engine='heuristic'`` (the same rule, the same numbers): it resumes."""
    if recorded.startswith(_LEGACY_AUTO) and description.startswith(_RULE):
        recorded = _RULE + recorded[len(_LEGACY_AUTO) :]
    return recorded == description


_LEGACY_AUTO, _RULE = "engine='auto' ", "engine='heuristic' "


def merged(previous: Sequence[Any], current: Sequence[Any]) -> list[Any]:
    """``previous`` then the entries of ``current`` it lacks, in order (a resume's methods and seeds)."""
    return [*previous, *(x for x in current if x not in previous)]
