"""The QM9 model (needs torch_geometric): our shared-edge-matrix conv equals NNConv, shapes, batch independence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from taskbalance.benchmarks.datasets import cache
from taskbalance.benchmarks.datasets import qm9 as qd
from tests.benchmarks.datasets.test_qm9 import _tiny, write_qm9pack_dir

pyg_nn = pytest.importorskip("torch_geometric.nn")
qm = pytest.importorskip("taskbalance.benchmarks.models.mpnn")


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))


@pytest.fixture
def data(tmp_path: Path) -> qd.QM9Data:
    return qd.QM9Data(qd.build_arrays(write_qm9pack_dir(tmp_path / "src"), use_rdkit=False, progress=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edge_conditioned_conv_equals_nnconv(data: qd.QM9Data, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    dim = 8
    g = data.graphs(torch.tensor([0, 1, 2, 5]))
    edge_net = torch.nn.Sequential(torch.nn.Linear(5, 128), torch.nn.ReLU(), torch.nn.Linear(128, dim * dim))
    reference = pyg_nn.NNConv(dim, dim, edge_net, aggr="mean").to(dtype)
    torch.nn.init.normal_(reference.bias)  # NNConv starts at zero bias; make it count
    ours = qm.EdgeConditionedConv(dim).to(dtype)
    ours.load_state_dict(reference.state_dict())  # same parameter names, strict
    x = torch.randn(g.x.shape[0], dim, dtype=dtype)
    edge_attr = g.edge_attr.to(dtype)
    # drop the edges into atom 0, so a node without incoming messages is covered too
    keep = g.edge_index[1] != 0
    edge_index, edge_attr = g.edge_index[:, keep], edge_attr[keep]
    expected = reference(x, edge_index, edge_attr)
    actual = ours(x, edge_index, ours.edge_weights(edge_attr))
    torch.testing.assert_close(actual, expected)
    expected.square().sum().backward()
    actual.square().sum().backward()
    for name, parameter in ours.named_parameters():
        torch.testing.assert_close(parameter.grad, reference.get_parameter(name).grad, msg=name)


def test_model_shapes_and_split(data: qd.QM9Data) -> None:
    torch.manual_seed(0)
    model = qm.QM9Net(n_tasks=11)
    features, outputs = model(data.graphs(torch.tensor([0, 3, 7])))
    assert features.shape == (3, 64) and (features >= 0).all()  # ReLU features, as the reference
    assert len(outputs) == 11 and all(o.shape == (3, 1) for o in outputs)
    assert len(model.heads) == 11
    shared = sum(p.numel() for p in model.encoder.parameters())
    assert shared + 11 * 65 == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="n_tasks"):
        qm.QM9Net(n_tasks=0)


def test_molecules_do_not_interact_in_a_batch(data: qd.QM9Data) -> None:
    torch.manual_seed(0)
    model = qm.QM9Net().eval()
    with torch.no_grad():
        _, alone = model(data.graphs(torch.tensor([4])))
        _, batched = model(data.graphs(torch.tensor([1, 4, 9])))
    torch.testing.assert_close(torch.cat(batched, 1)[1:2], torch.cat(alone, 1), atol=1e-5, rtol=1e-5)


def test_rigid_motion_invariance(tmp_path: Path) -> None:
    """Fixture rows 3 and 4 are rotated and shifted copies of ammonia and water (rows 1 and 2): the model sees
    only distances, so it gives the same outputs."""
    arrays = qd.build_arrays(write_qm9pack_dir(tmp_path / "src"), use_rdkit=False, progress=False)
    data = qd.QM9Data(arrays)
    torch.manual_seed(0)
    model = qm.QM9Net().eval()
    with torch.no_grad():
        _, original = model(data.graphs(torch.tensor([1, 2])))
        _, moved = model(data.graphs(torch.tensor([3, 4])))
    torch.testing.assert_close(torch.cat(moved, 1), torch.cat(original, 1), atol=1e-4, rtol=1e-4)


def test_benchmark_training_fits_a_tiny_set(tmp_path: Path) -> None:
    bench = _tiny()(data_dir=str(write_qm9pack_dir(tmp_path / "src")))
    torch.manual_seed(0)
    model = bench.model()
    optimizer = bench.optimizer(model.parameters())
    batch = next(iter(bench.loader("train", batch_size=5, shuffle=False, generator=torch.Generator())))
    graphs, targets = bench.to_device(batch, torch.device("cpu"))
    totals = []
    for _ in range(30):
        optimizer.zero_grad()
        total = bench.losses(model(graphs)[1], targets).sum()
        torch.autograd.backward(total)
        optimizer.step()
        totals.append(float(total.detach()))
    assert totals[-1] < 0.5 * totals[0]
