"""A resume continues the same experiment or refuses with one line: the data, the protocol, the versions and the
methods are fingerprinted; a resume that adds or drops methods keeps the finished ones; checkpoints are verified;
a torn weights.csv line, a failed start and hand-edited files never crash or wedge a run folder."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import pytest

from taskbalance.benchmarks.base import TrainingProtocol
from taskbalance.benchmarks.datasets import cache
from taskbalance.benchmarks.report.markdown import write_report
from taskbalance.benchmarks.runner.checkpoint import CheckpointError
from taskbalance.benchmarks.runner.compare import run
from taskbalance.benchmarks.runner.training import Job

from .tiny import EPOCHS, Killed, TinyBenchmark, kill_at


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))


def _run(out: Path, methods: list[str], **kwargs: Any) -> Any:
    bench = kwargs.pop("bench", None) or TinyBenchmark()
    return run(bench, methods, out_dir=out, threads=1, progress=False, **kwargs)


def _data(folder: Path, text: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "x.csv").write_text(text)
    return str(folder)


def _trained(out: Path, methods: list[str], **kwargs: Any) -> list[str]:
    """The jobs that trained at least one step (``stl:<task>`` for a baseline)."""
    seen: list[str] = []

    def hook(job: Job, epoch: int, step: int) -> None:
        label = job.spec if job.task is None else f"stl:{job.task}"
        if label not in seen:
            seen.append(label)

    _run(out, methods, on_step=hook, **kwargs)
    return seen


# -- item 1: the data, settings and versions are fingerprinted -------------------------------------------------
def test_resume_with_other_data_is_refused_naming_the_file(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _data(tmp_path / "a", "1,2,3\n")
    _run(out, ["ew"], bench=TinyBenchmark(data_dir=first))
    other = _data(tmp_path / "b", "9,9,9\n")
    with pytest.raises(ValueError, match=r"the data differ from the run's \(data_dir/x\.csv sha256 \w{8}… != \w{8}…\)"):
        _run(out, ["ew"], bench=TinyBenchmark(data_dir=other), resume=True)
    # the same bytes elsewhere are the same data: the resume goes on (nothing left to train)
    moved = _data(tmp_path / "c", "1,2,3\n")
    assert _trained(out, ["ew"], bench=TinyBenchmark(data_dir=moved), resume=True) == []
    # the data edited in place are not
    config = (out / "config.json").read_text()
    (Path(first) / "x.csv").write_text("1,2,4\n")
    with pytest.raises(ValueError, match="the data differ"):
        _run(out, ["ew"], bench=TinyBenchmark(data_dir=first), resume=True)
    (Path(moved) / "extra.csv").write_text("")
    with pytest.raises(ValueError, match=r"data_dir/extra\.csv is new"):
        _run(out, ["ew"], bench=TinyBenchmark(data_dir=moved), resume=True)
    assert (out / "config.json").read_text() == config  # a refused resume leaves the folder as it was


def test_single_task_baselines_are_cached_by_the_datas_content(tmp_path: Path) -> None:
    assert _trained(tmp_path / "r1", ["ew"], bench=TinyBenchmark(data_dir=_data(tmp_path / "a", "1"))) == [
        "stl:0", "stl:1", "ew"
    ]  # fmt: skip
    # other bytes: baselines trained again; the same bytes at another path: reused
    assert "stl:0" in _trained(tmp_path / "r2", ["ew"], bench=TinyBenchmark(data_dir=_data(tmp_path / "b", "2")))
    assert _trained(tmp_path / "r3", ["ew"], bench=TinyBenchmark(data_dir=_data(tmp_path / "c", "1"))) == ["ew"]


class _OtherLr(TinyBenchmark):
    protocols: ClassVar[dict[str, TrainingProtocol]] = {
        "tiny": TrainingProtocol("tiny", epochs=EPOCHS, batch_size=16, lr=5e-3, description="synthetic", reduced=True)
    }


def test_resume_refuses_other_settings_and_versions_with_one_line(tmp_path: Path, monkeypatch: Any) -> None:
    from taskbalance.benchmarks.runner import fingerprint

    out = tmp_path / "run"
    _run(out, ["ew"])
    refusals = [
        (dict(bench=_OtherLr()), r"different settings \(protocol lr: 0\.01 → 0\.005\)"),
        (dict(epochs=2), r"different settings \(epochs: 3 → 2\)"),
    ]
    for kwargs, message in refusals:
        with pytest.raises(ValueError, match=message) as raised:
            _run(out, ["ew"], resume=True, **kwargs)
        assert "\n" not in str(raised.value)
    monkeypatch.setattr(fingerprint, "__version__", "99.0")
    with pytest.raises(ValueError, match=r"written by taskbalance 0\.1\.0 / torch .*, this is taskbalance 99\.0"):
        _run(out, ["ew"], resume=True)


def test_resume_refuses_a_method_built_differently(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(out, ["nashmtl[update_weights_every=2]"], epochs=1)
    config = json.loads((out / "config.json").read_text())
    spec = "nashmtl[update_weights_every=2]"
    config["fingerprint"]["methods"][spec] = config["fingerprint"]["methods"][spec].replace(
        "max_norm=1.0", "max_norm=2.0"
    )
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(f"method {spec} is built differently")):
        _run(out, [spec], epochs=1, resume=True)


def test_a_run_trains_on_the_rule_and_resumes_one_written_when_auto_was_the_rule(tmp_path: Path) -> None:
    """The runner builds engine="heuristic" (its numbers must not depend on timings) unless the spec names a path;
    a run folder written before "auto" measured says engine='auto' for that same rule and resumes."""
    out = tmp_path / "run"
    _run(out, ["mgda", "mgda[engine=auto]"], epochs=1)
    config = json.loads((out / "config.json").read_text())
    methods = config["fingerprint"]["methods"]
    assert methods["mgda"].startswith("engine='heuristic' ")
    assert methods["mgda[engine=auto]"].startswith("engine='auto' ")
    methods["mgda"] = methods["mgda"].replace("engine='heuristic' ", "engine='auto' ")
    (out / "config.json").write_text(json.dumps(config))
    _run(out, ["mgda"], epochs=1, resume=True)  # accepted
    methods["mgda[engine=auto]"] = methods["mgda[engine=auto]"].replace("engine='auto' ", "engine='heuristic' ")
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape("method mgda[engine=auto] is built differently")):
        _run(out, ["mgda[engine=auto]"], epochs=1, resume=True)


def _as_written_before_fingerprints(out: Path) -> None:
    config = json.loads((out / "config.json").read_text())
    del config["fingerprint"]
    (out / "config.json").write_text(json.dumps(config))
    (out / "data_manifest.json").unlink()


def test_a_folder_without_fingerprint_resumes_when_what_it_records_matches(tmp_path: Path) -> None:
    out = tmp_path / "run"
    data = _data(tmp_path / "a", "1")
    _run(out, ["ew"], bench=TinyBenchmark(data_dir=data))
    _as_written_before_fingerprints(out)
    with pytest.raises(ValueError, match=r"different settings \(data_dir: '.*a' → '.*b'\)"):
        _run(out, ["ew"], bench=TinyBenchmark(data_dir=_data(tmp_path / "b", "1")), resume=True)
    with pytest.raises(ValueError, match=r"different settings \(epochs"):
        _run(out, ["ew"], bench=TinyBenchmark(data_dir=data), epochs=2, resume=True)
    assert _trained(out, ["ew"], bench=TinyBenchmark(data_dir=data), resume=True) == []
    assert "fingerprint" in json.loads((out / "config.json").read_text())  # checked fully from now on
    (Path(data) / "x.csv").write_text("2")
    with pytest.raises(ValueError, match="the data differ"):
        _run(out, ["ew"], bench=TinyBenchmark(data_dir=data), resume=True)


# -- item 6: a resume that adds or drops methods keeps the finished ones --------------------------------------
def test_resume_with_other_methods_keeps_the_finished_ones(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _run(out, ["ew"])
    assert _trained(out, ["si"], resume=True) == ["si"]
    config = json.loads((out / "config.json").read_text())
    assert config["methods"] == ["ew", "si"]
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["ew", "si"]
    assert results["methods"]["ew"] == first.results["methods"]["ew"] | {
        "mean_rank": results["methods"]["ew"]["mean_rank"]
    }
    assert {row.split(",")[0] for row in (out / "results.csv").read_text().splitlines()[1:]} == {"stl", "ew", "si"}
    report = write_report(out, plots=False).read_text()
    assert "| ew |" in report and "| si |" in report
    # dropping one keeps it too; adding a seed adds runs, and a method short of a seed says so
    _run(out, ["si"], seeds=[0, 1], resume=True)
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and results["methods"]["ew"]["seeds"] == [0]
    assert results["methods"]["si"]["seeds"] == [0, 1]
    assert "ew: seed 0 only" in results["notes"]


# -- item 9: method folders are named from the sanitised canonical spec ---------------------------------------
def test_method_folders_keep_their_names_and_never_leave_runs(tmp_path: Path) -> None:
    from taskbalance.benchmarks.report.folder import method_dir
    from taskbalance.benchmarks.runner.fingerprint import canonical_spec

    for spec, name in [
        ("ew", "ew"),
        ("igbv1+nashmtl", "igbv1__nashmtl"),
        ("nashmtl[update_weights_every=10]", "nashmtl[update_weights_every=10]"),
        ("NashMTL[ update_weights_every = 10 ]", "nashmtl[update_weights_every=10]"),
        ("cagrad[rescale=1, c=.50]", "cagrad[c=0.5,rescale=1]"),
        ("uw[log_losses=No]", "uw[log_losses=false]"),
    ]:
        assert method_dir(canonical_spec(spec, 2)) == name, spec
    hostile = ["x[p=/../../../../escape]", "..", ".", "", "a/b", "a\\b", "x[p=..]", "UPPER", "x" * 300, "-rf", "\x00"]
    names = [method_dir(s) for s in hostile]
    assert len(set(names)) == len(names)
    runs = tmp_path / "runs"
    for spec, name in zip(hostile, names, strict=True):
        assert re.fullmatch(r"[a-z0-9][a-z0-9_.=,()\[\]-]{0,95}", name), (spec, name)
        assert (runs / name).resolve().parent == runs.resolve()
    # the spec: refused by its declared type before any folder is named
    for spec in ("uw[log_losses=/../../../../escape]", "mgda[normalization=/../../escape]"):
        with pytest.raises(ValueError, match="expected"):
            _run(tmp_path / "out", [spec])
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("escape*"))
    with pytest.raises(ValueError, match="listed twice: ew"):
        _run(tmp_path / "out", ["ew", "EW"])


# -- item 5: checkpoints are verified ----------------------------------------------------------------------------
def _flip_bits_in_tensor_data(checkpoint: Path) -> None:
    """One bit per 97 bytes flipped inside the largest tensor record (the zip structure stays valid)."""
    data = bytearray(checkpoint.read_bytes())
    with zipfile.ZipFile(checkpoint) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    for offset in range(start, start + info.file_size, 97):
        data[offset] ^= 0x10
    checkpoint.write_bytes(bytes(data))


def test_a_checkpoint_with_flipped_bits_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(Killed):
        _run(out, ["ew"], on_step=kill_at("ew", 2, 1))
    checkpoint = out / "runs" / "ew" / "seed0" / "checkpoint.pt"
    _flip_bits_in_tensor_data(checkpoint)
    with pytest.raises(CheckpointError, match=r"is corrupt \(record .* fails its CRC check\); delete") as raised:
        _run(out, ["ew"], resume=True)
    assert "\n" not in str(raised.value)


# -- a torn weights.csv line ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("torn", ["5", "5,2", "5,2,0.4", "5,2,0.43,1.", "5,2,0.43,1.5e"])
def test_a_torn_weights_line_is_repaired_on_resume(tmp_path: Path, torn: str) -> None:
    reference = tmp_path / "reference"
    _run(reference, ["ew"])
    out = tmp_path / "run"
    with pytest.raises(Killed):
        _run(out, ["ew"], on_step=kill_at("ew", 2, 2))
    weights = out / "runs" / "ew" / "seed0" / "weights.csv"
    with weights.open("a") as handle:
        handle.write(torn)  # what a kill in the middle of an append (before this fix) left
    _run(out, ["ew"], resume=True)
    assert weights.read_text() == (reference / "runs" / "ew" / "seed0" / "weights.csv").read_text()


# -- a failed start leaves no config.json ------------------------------------------------------------------------
class _NoData(TinyBenchmark):
    def loader(self, split: Any, *, batch_size: int, shuffle: bool, generator: Any) -> Any:
        raise FileNotFoundError("no data in the given folder")


class _NoExtra(TinyBenchmark):
    def model(self) -> Any:
        raise ImportError("the model needs torch_geometric: pip install 'taskbalance[qm9]'")


@pytest.mark.parametrize(("bench", "error"), [(_NoData, FileNotFoundError), (_NoExtra, ImportError)])
def test_a_failed_start_leaves_no_run_folder(tmp_path: Path, bench: type[TinyBenchmark], error: type) -> None:
    out = tmp_path / "run"
    for _ in range(2):  # the same command fails the same way, without asking for --resume
        with pytest.raises(error):
            _run(out, ["ew"], bench=bench())
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(error):
        _run(existing, ["ew"], bench=bench())
    assert existing.is_dir() and not any(existing.iterdir())
    _run(existing, ["ew"])  # and then it works


def test_a_failed_resume_keeps_its_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(out, ["ew"])
    with pytest.raises(FileNotFoundError):
        _run(out, ["si"], bench=_NoData(), resume=True)
    assert json.loads((out / "config.json").read_text())["methods"] == ["ew", "si"]


# -- hand-edited files ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    ["{not json", "[1, 2]", '{"methods": "ew", "seeds": [0]}', '{"methods": [], "seeds": [0], "fingerprint": 3}'],
)
def test_a_hand_edited_config_is_one_line_on_resume_and_report(tmp_path: Path, text: str) -> None:
    out = tmp_path / "run"
    _run(out, ["ew"])
    (out / "config.json").write_text(text)
    for action in (lambda: _run(out, ["ew"], resume=True), lambda: write_report(out, plots=False)):
        with pytest.raises(ValueError, match=re.escape(str(out / "config.json")) + "|cannot resume") as raised:
            action()
        assert "\n" not in str(raised.value)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"best_epoch": 1}', '{"best_epoch": "x", "test": {}}'])
def test_a_hand_edited_final_json_is_rebuilt_or_one_line(tmp_path: Path, text: str) -> None:
    out = tmp_path / "run"
    first = _run(out, ["ew", "si"])
    final = out / "runs" / "si" / "seed0" / "final.json"
    final.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(final))) as raised:
        write_report(out, plots=False)
    assert "\n" not in str(raised.value)
    # a resume of another method reads it: one line naming it
    with pytest.raises(ValueError, match=re.escape(str(final))):
        _run(out, ["ew"], resume=True)
    # a resume of its own method rebuilds it from the finished checkpoint, without training
    assert _trained(out, ["si"], resume=True) == []
    assert json.loads((out / "results.json").read_text())["methods"]["si"] == first.results["methods"]["si"]
