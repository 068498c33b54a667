"""QM9 data without qm9pack: parsing, units and atomization energies, graphs, split, target scaling, metrics.

The fixture writes molecules in qm9pack's own CSV layout (the same 25 columns, quoting and number formats);
methane, ammonia and water carry their real QM9 coordinates and properties, the rest are rigid motions of them
with made-up properties.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from taskbalance.benchmarks.base import TrainingProtocol
from taskbalance.benchmarks.datasets import cache
from taskbalance.benchmarks.datasets import qm9 as qd
from taskbalance.benchmarks.qm9 import QM9Benchmark, QM9Evaluator

HEADER = [
    *("XYZ_file", "Index", "SMILES", "InChi", "N_atoms", "Stoichiometry", "Elements", "XYZ_Ang", "Mulliken_pop"),
    *("Harmonic_Freq_cmi", "RotA_GHz", "RotB_GHz", "RotC_GHz", "Dipole_debye", "Polarizability_bohr3", "HOMO_au"),
    *("LUMO_au", "HOMO_LUMO_gap_au", "R2_bohr2", "ZPVE_au", "InternalEnergy_0K_au", "InternalEnergy_298K_au"),
    *("Enthalphy_298K_au", "GibbsFreeEnergy_298K_au", "Heatcapacity_Cv_cal_mol_K"),
]
#: (index, smiles, elements, coordinates Å, (μ, α, HOMO, LUMO, gap, R², ZPVE, U0, U, H, G, Cv)) from QM9
REAL = [
    (
        1,
        "C",
        ["C", "H", "H", "H", "H"],
        [
            [-0.0126981359, 1.0858041578, 0.0080009958],
            [0.002150416, -0.0060313176, 0.0019761204],
            [1.0117308433, 1.4637511618, 0.0002765748],
            [-0.540815069, 1.4475266138, -0.8766437152],
            [-0.5238136345, 1.4379326443, 0.9063972942],
        ],
        (0.0, 13.21, -0.3877, 0.1171, 0.5048, 35.3641, 0.044749, -40.47893, -40.476062, -40.475117, -40.498597, 6.469),
    ),
    (
        2,
        "N",
        ["N", "H", "H", "H"],
        [
            [-0.0404260543, 1.0241077531, 0.0625637998],
            [0.0172574639, 0.0125452063, -0.0273771593],
            [0.9157893661, 1.3587451948, -0.0287577581],
            [-0.5202777357, 1.3435321258, -0.7755426124],
        ],
        (
            1.6256,
            9.46,
            -0.257,
            0.0829,
            0.3399,
            26.1563,
            0.034358,
            -56.525887,
            -56.523026,
            -56.522082,
            -56.544961,
            6.316,
        ),
    ),
    (
        3,
        "O",
        ["O", "H", "H"],
        [
            [-0.0343604951, 0.9775395708, 0.0076015923],
            [0.0647664923, 0.0205721989, 0.0015346341],
            [0.8717903737, 1.3007924048, 0.0006931336],
        ],
        (
            1.8511,
            6.31,
            -0.2928,
            0.0687,
            0.3615,
            19.0002,
            0.021375,
            -76.404702,
            -76.401867,
            -76.400922,
            -76.422349,
            6.002,
        ),
    ),
]
N_MOLECULES = 36


def _number(value: float) -> str:
    """qm9pack writes integral floats as ``0.`` and small ones with an exponent, e.g. ``1.E-5``."""
    if value == int(value):
        return f"{int(value)}."
    return repr(float(value))


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def fixture_molecules(n: int = N_MOLECULES, seed: int = 0) -> list[tuple[int, str, list[str], np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    molecules = [(i, s, e, np.array(xyz), np.array(p)) for i, s, e, xyz, p in REAL]
    for index in range(len(REAL) + 1, n + 1):
        _, smiles, elements, xyz, props = REAL[index % len(REAL)]
        moved = np.array(xyz) @ _rotation(rng).T + rng.normal(size=3)
        noisy = np.array(props) * (1 + 0.1 * rng.normal(size=len(props)))
        molecules.append((index, smiles, elements, moved, noisy))
    return molecules


def write_qm9pack_dir(directory: Path, n: int = N_MOLECULES, seed: int = 0) -> Path:
    """Molecules in qm9pack's three CSV files (a third each, like the real split of the data)."""
    directory.mkdir(parents=True, exist_ok=True)
    molecules = fixture_molecules(n, seed)
    thirds = np.array_split(np.arange(len(molecules)), 3)
    for name, part in zip(qd.FILES, thirds, strict=True):
        with open(directory / name, "w", newline="") as handle:
            writer = csv.writer(handle, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
            writer.writerow(HEADER)
            for k in part:
                index, smiles, elements, xyz, props = molecules[k]
                counts = [elements.count(e) for e in qd.ELEMENTS]
                coords = "[" + ",".join("[" + ",".join(_number(v) for v in atom) + "]" for atom in xyz) + "]"
                row = [f"dsgdb9nsd_{index:06d}.xyz", index, smiles, "InChI=1S/fixture", len(elements)]
                row += ["[" + ",".join(map(str, counts)) + "]", "[" + ",".join(f"'{e}'" for e in elements) + "]"]
                row += [coords, "[0.1]", "[1000.0]", 1.0, 1.0, 1.0]
                row += [_number(float(v)) for v in props]
                writer.writerow(row)
    return directory


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_qm9pack_dir(tmp_path / "qm9pack")


@pytest.fixture
def fallback_arrays(source: Path) -> dict[str, np.ndarray]:
    return qd.build_arrays(source, use_rdkit=False, progress=False)


def _tiny(protocol: str = "tiny") -> type[QM9Benchmark]:
    """QM9Benchmark on the fixture: 6 validation and 6 test molecules, 20 of the 24 training ones."""

    class Tiny(QM9Benchmark):
        val_size = 6
        test_size = 6
        protocols = {  # noqa: RUF012 - mirrors the parent's class attribute
            "tiny": TrainingProtocol("tiny", 1, 5, 1e-3, "fixture", reduced=True, train_size=20, eval_size=None),
            "plain": TrainingProtocol("plain", 1, 5, 1e-3, "fixture"),
        }
        default_protocol = protocol

    return Tiny


# -- parsing and units ---------------------------------------------------------------------------------------------


def test_parse_qm9pack_number_formats() -> None:
    assert qd.parse_positions("[[0.5,0.,1.],[-2.5,1.E-5,3]]").tolist() == [[0.5, 0.0, 1.0], [-2.5, 1e-5, 3.0]]
    assert qd.parse_elements("['C','H','H']") == ["C", "H", "H"]
    with pytest.raises(ValueError, match="triples"):
        qd.parse_positions("[[0.5,0.]]")
    with pytest.raises(ValueError, match="Cl"):
        qd.parse_elements("['C','Cl']")


def test_methane_targets_in_report_units_by_hand() -> None:
    """CH₄: U₀_atom = (−40.47893 − (4·(−0.500273) − 37.846772)) Ha = −0.631066 Ha = −17172.18 meV, etc."""
    props = np.array([REAL[0][4][:4] + REAL[0][4][5:]])  # drop the HOMO-LUMO gap: the 11 task columns
    counts = np.array([[4, 1, 0, 0, 0]])
    y = qd.targets_in_report_units(props, counts)[0]
    expected = [0.0, 13.21, -10549.8544476, 3186.4533294, 35.3641, 1217.6823231]
    expected += [-17172.1806727, -17286.8222430, -17389.6540716, -16151.9169568, 6.469]
    np.testing.assert_allclose(y, expected, rtol=1e-9, atol=1e-6)


def test_atomref_table_matches_torch_geometric_ev_values() -> None:
    """torch_geometric's atomref (eV) for U₀ is our Hartree table times 27.211386246 (its constant)."""
    pyg_u0_ev = [-13.61312172, -1029.86312267, -1485.30251237, -2042.61123593, -2713.48485589]
    pyg_g_ev = [-13.90303183, -1030.25891228, -1485.71166277, -2043.01812778, -2713.88796536]
    np.testing.assert_allclose(qd.ATOMREF_HARTREE[:, 0] * qd.HARTREE_TO_MEV / 1000, pyg_u0_ev, atol=2e-5)
    np.testing.assert_allclose(qd.ATOMREF_HARTREE[:, 3] * qd.HARTREE_TO_MEV / 1000, pyg_g_ev, atol=2e-5)


def test_read_molecules_from_fixture(source: Path) -> None:
    molecules = list(qd.read_molecules(source))
    assert [m.index for m in molecules] == list(range(1, N_MOLECULES + 1))
    water = molecules[2]
    assert water.elements == ["O", "H", "H"] and water.positions.shape == (3, 3)
    assert water.properties[6] == -76.404702  # U₀ column, untouched by reading


def test_missing_or_foreign_source_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(qd.QM9SourceError, match="qm9pack"):
        qd.source_dir(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in qd.FILES:
        (bad / name).write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a qm9pack file"):
        list(qd.read_molecules(qd.source_dir(bad)))


def test_build_arrays_layout_and_order(fallback_arrays: dict[str, np.ndarray]) -> None:
    a = fallback_arrays
    assert a["index"].tolist() == list(range(1, N_MOLECULES + 1))
    sizes = np.diff(a["atom_ptr"])
    assert sizes[:3].tolist() == [5, 4, 3] and a["x"].shape == (sizes.sum(), qd.N_NODE_FEATURES)
    assert a["pos"].shape == (sizes.sum(), 3) and a["y"].shape == (N_MOLECULES, 11)
    assert (a["bond_source"] == qd.BONDS_FALLBACK).all()
    assert np.diff(a["bond_ptr"])[:3].tolist() == [4, 3, 2]  # X–H bonds of CH₄, NH₃, H₂O


# -- node features and bonds ---------------------------------------------------------------------------------------


def test_fallback_features_of_methane() -> None:
    elements, xyz = REAL[0][2], np.array(REAL[0][3])
    x, bonds, types, source = qd.featurize(elements, xyz, use_rdkit=False)
    assert source == qd.BONDS_FALLBACK
    assert sorted(map(tuple, bonds.tolist())) == [(0, 1), (0, 2), (0, 3), (0, 4)] and (types == 0).all()
    #        H  C  N  O  F  Z  arom sp sp2 sp3 num_hs
    carbon = [0, 1, 0, 0, 0, 6, 0, 0, 0, 0, 4]
    hydrogen = [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert x.tolist() == [carbon, *[hydrogen] * 4]


def _benzene() -> tuple[list[str], np.ndarray]:
    angles = np.arange(6) * math.pi / 3
    ring = np.stack([np.cos(angles), np.sin(angles), np.zeros(6)], axis=1)
    return ["C"] * 6 + ["H"] * 6, np.concatenate([1.39 * ring, 2.47 * ring])


def test_rdkit_features_methane_and_benzene() -> None:
    pytest.importorskip("rdkit")
    x, bonds, types, source = qd.featurize(REAL[0][2], np.array(REAL[0][3]), use_rdkit=True)
    assert source == qd.BONDS_RDKIT and (types == 0).all() and len(bonds) == 4
    assert x[0].tolist() == [0, 1, 0, 0, 0, 6, 0, 0, 0, 1, 4]  # sp³ carbon with four hydrogens
    elements, xyz = _benzene()
    x, bonds, types, source = qd.featurize(elements, xyz, use_rdkit=True)
    carbons = x[:6]
    assert source == qd.BONDS_RDKIT
    assert (carbons[:, 6] == 1).all() and (carbons[:, 8] == 1).all() and (carbons[:, 10] == 1).all()
    ring = [t for (i, j), t in zip(bonds.tolist(), types.tolist(), strict=True) if i < 6 and j < 6]
    assert ring == [3] * 6  # six aromatic C–C bonds


def test_rdkit_failure_falls_back() -> None:
    pytest.importorskip("rdkit")
    # a lone carbon with one hydrogen (CH radical) cannot be given a neutral closed-shell bond assignment
    x, bonds, _, source = qd.featurize(["C", "H"], np.array([[0.0, 0, 0], [1.1, 0, 0]]), use_rdkit=True)
    assert source == qd.BONDS_FALLBACK and bonds.tolist() == [[0, 1]] and x[0, 10] == 1


# -- complete graphs -----------------------------------------------------------------------------------------------


def test_complete_graph_edges_distances_and_bonds(fallback_arrays: dict[str, np.ndarray]) -> None:
    data = qd.QM9Data(fallback_arrays)
    g = data.graphs(torch.tensor([2, 0]))  # water (3 atoms) then methane (5)
    assert g.num_graphs == 2 and g.batch.tolist() == [0] * 3 + [1] * 5
    assert g.x.shape == (8, 11) and g.x[0, 3] == 1 and g.x[3, 1] == 1  # O first, then C
    assert g.edge_index.shape == (2, 3 * 2 + 5 * 4) and g.edge_attr.shape == (26, 5)
    row, col = g.edge_index
    assert (row != col).all() and (g.batch[row] == g.batch[col]).all()
    assert g.edge_index[:, :6].tolist() == [[0, 0, 1, 1, 2, 2], [1, 2, 0, 2, 0, 1]]  # source-major like Complete()
    pos = torch.cat([data.pos[9:12], data.pos[0:5]])
    torch.testing.assert_close(g.edge_attr[:, 4], (pos[col] - pos[row]).norm(dim=1))
    bonded = {(0, 1), (0, 2), (1, 0), (2, 0)} | {(3, k) for k in range(4, 8)} | {(k, 3) for k in range(4, 8)}
    single = {(r, c) for r, c, s in zip(row.tolist(), col.tolist(), g.edge_attr[:, 0].tolist(), strict=True) if s}
    assert single == bonded and g.edge_attr[:, 1:4].sum() == 0


def test_graph_batching_is_concatenation(fallback_arrays: dict[str, np.ndarray]) -> None:
    data = qd.QM9Data(fallback_arrays)
    one, two = data.graphs(torch.tensor([4])), data.graphs(torch.tensor([7]))
    both = data.graphs(torch.tensor([4, 7]))
    n = one.x.shape[0]
    torch.testing.assert_close(both.x, torch.cat([one.x, two.x]))
    torch.testing.assert_close(both.edge_attr, torch.cat([one.edge_attr, two.edge_attr]))
    assert both.edge_index.tolist() == torch.cat([one.edge_index, two.edge_index + n], dim=1).tolist()


# -- split, scaling, loader, metrics -------------------------------------------------------------------------------


def test_split_sizes_disjoint_covering_deterministic() -> None:
    s = qd.split_indices(1000, seed=3, val_size=100, test_size=150)
    assert [len(s[k]) for k in ("train", "val", "test")] == [750, 100, 150]
    assert sorted(np.concatenate(list(s.values())).tolist()) == list(range(1000))
    again = qd.split_indices(1000, seed=3, val_size=100, test_size=150)
    assert all((s[k] == again[k]).all() for k in s)
    assert not (qd.split_indices(1000, seed=4, val_size=100, test_size=150)["test"] == s["test"]).all()
    with pytest.raises(ValueError, match="val_size"):
        qd.split_indices(100, seed=0, val_size=50, test_size=50)
    with pytest.raises(ValueError, match="seed"):
        qd.split_indices(100, seed=-1, val_size=5, test_size=5)


def test_standard_split_sizes_of_full_qm9() -> None:
    s = qd.split_indices(130_831, seed=0)
    assert [len(s[k]) for k in ("train", "val", "test")] == [110_831, 10_000, 10_000]


def test_scaler_uses_training_molecules_only(source: Path) -> None:
    bench = _tiny()(data_dir=str(source))
    train, val, test = (bench.split_ids(s) for s in ("train", "val", "test"))
    assert len(train) == 20 and len(val) == 6 and len(test) == 6
    assert not set(train.tolist()) & (set(val.tolist()) | set(test.tolist()))
    y = bench._setup()[0].y
    torch.testing.assert_close(bench.scaler.mean, y[train].mean(0))
    torch.testing.assert_close(bench.scaler.std, y[train].std(0))
    z = torch.cat([t for _, t in bench.loader("train", batch_size=7, shuffle=False, generator=torch.Generator())])
    torch.testing.assert_close(z.mean(0), torch.zeros(11), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(11), atol=1e-5, rtol=0)
    other = _tiny()(data_dir=str(source))
    other._setup()[0].y[val] += 1e6  # validation and test targets must not move the statistics
    other._setup()[0].y[test] -= 1e6
    torch.testing.assert_close(other.scaler.mean, bench.scaler.mean)


def test_plain_protocol_uses_whole_splits(source: Path) -> None:
    bench = _tiny("plain")(data_dir=str(source))
    assert [len(bench.split_ids(s)) for s in ("train", "val", "test")] == [24, 6, 6]


def test_loader_order_from_generator_only(source: Path) -> None:
    bench = _tiny()(data_dir=str(source))

    def first_targets(seed: int) -> torch.Tensor:
        loader = bench.loader("train", batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(seed))
        assert len(loader) == 4
        return torch.cat([t for _, t in loader])

    assert torch.equal(first_targets(1), first_targets(1)) and not torch.equal(first_targets(1), first_targets(2))
    ordered = torch.cat([t for _, t in bench.loader("train", batch_size=5, shuffle=False, generator=torch.Generator())])
    torch.testing.assert_close(first_targets(1).sort(0).values, ordered.sort(0).values)


def test_losses_are_per_task_mse() -> None:
    bench = QM9Benchmark()
    outputs = [torch.tensor([[1.0], [3.0]])] + [torch.zeros(2, 1)] * 10
    targets = torch.zeros(2, 11)
    targets[:, 1] = 2.0
    expected = torch.zeros(11)
    expected[0], expected[1] = (1 + 9) / 2, 4.0
    torch.testing.assert_close(bench.losses(outputs, targets), expected)


def test_evaluator_mae_in_report_units() -> None:
    std = torch.arange(1.0, 12.0, dtype=torch.float64) * 1000  # e.g. 1000 meV for the first target
    evaluator = QM9Evaluator(std)
    outputs = [torch.full((2, 1), 0.5)] * 11
    evaluator.update(outputs, torch.zeros(2, 11))  # |error| 0.5 on two molecules
    evaluator.update([torch.zeros(1, 1)] * 11, torch.full((1, 11), -2.0))  # |error| 2 on one
    mae = evaluator.compute()
    assert list(mae) == [f"mae/{t}" for t in qd.TASKS]
    for k, task in enumerate(qd.TASKS):
        assert mae[f"mae/{task}"] == pytest.approx((0.5 + 0.5 + 2.0) / 3 * (k + 1) * 1000)
    with pytest.raises(ValueError, match="no batch"):
        QM9Evaluator(std).compute()


def test_validation_loss_and_scheduler(source: Path) -> None:
    bench = _tiny()(data_dir=str(source))
    std = bench.scaler.std.tolist()
    metrics = {f"mae/{t}": 0.5 * s for t, s in zip(qd.TASKS, std, strict=True)}
    assert bench.validation_loss(metrics) == pytest.approx(0.5)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = bench.scheduler(optimizer)
    for _ in range(7):  # the first call sets the best; patience 5 → the 7th non-improving call cuts the rate
        bench.step_scheduler(scheduler, metrics)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(7e-4)


def test_cache_second_load_does_not_rebuild(source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = qd.load_arrays(source, progress=False)
    monkeypatch.setattr(qd, "build_arrays", lambda *a, **k: pytest.fail("rebuilt despite the cache"))
    second = qd.load_arrays(source, progress=False)
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)


def test_benchmark_contract() -> None:
    assert QM9Benchmark.name == "qm9" and QM9Benchmark.tasks == qd.TASKS
    assert all(not m.higher_is_better for m in QM9Benchmark.metrics)
    paper, quick = QM9Benchmark.protocols["paper"], QM9Benchmark.protocols["quick"]
    assert (paper.epochs, paper.batch_size, paper.lr, paper.reduced) == (300, 120, 1e-3, False)
    assert quick.reduced and "REDUCED" in QM9Benchmark(protocol="quick").describe()
    with pytest.raises(ValueError, match="protocol"):
        QM9Benchmark(protocol="fast")
