"""CelebA on a tiny release written by the test in the exact official layout (text files; JPEG / PNG via Pillow)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import taskbalance as tb
from taskbalance.benchmarks import celeba
from taskbalance.benchmarks.datasets import cache
from taskbalance.benchmarks.datasets import celeba as celeba_data
from taskbalance.benchmarks.datasets.mnist import DataSourceError
from taskbalance.benchmarks.models.resnet import CelebAResNet

N = 8
#: official partition column of the fixture, interleaved so that selection must follow it, not the file order
PARTITION = np.array([0, 0, 0, 1, 0, 2, 1, 2])
SIGNS = np.where(np.random.default_rng(0).random((N, 40)) < 0.3, 1, -1)
#: a distinct solid colour per image, so decoded pixels identify the image
COLOURS = np.array([[30 * i, 255 - 30 * i, (70 * i) % 256] for i in range(N)], dtype=np.uint8)
FILES = [f"{i + 1:06d}.jpg" for i in range(N)]


def write_text_files(attr_dir: Path, eval_dir: Path, signs: np.ndarray = SIGNS) -> None:
    """``list_attr_celeba.txt`` and ``list_eval_partition.txt`` formatted like the official ones."""
    attr_dir.mkdir(parents=True, exist_ok=True)
    eval_dir.mkdir(parents=True, exist_ok=True)
    rows = [f"{name} " + " ".join(f"{int(v):2d}" for v in row) for name, row in zip(FILES, signs, strict=True)]
    (attr_dir / celeba_data.ATTR_FILE).write_text(
        "\n".join([str(N), " ".join(celeba_data.ATTRIBUTES) + " ", *rows]) + "\n"
    )
    lines = [f"{name} {p}" for name, p in zip(FILES, PARTITION, strict=True)]
    (eval_dir / celeba_data.PARTITION_FILE).write_text("\n".join(lines) + "\n")


def write_release(root: Path, official_folders: bool = False, png: bool = False) -> Path:
    """A tiny CelebA release: 8 solid-colour 20×24 images (178×218 in the real one) and the two text files."""
    image_module = pytest.importorskip("PIL.Image")
    base = (root / "Img") if official_folders else root
    images = base / ("img_align_celeba_png" if png else "img_align_celeba")
    images.mkdir(parents=True)
    for name, colour in zip(FILES, COLOURS, strict=True):
        pixels = np.broadcast_to(colour, (24, 20, 3)).copy()
        image = image_module.fromarray(pixels, "RGB")
        if png:
            image.save(images / name.replace(".jpg", ".png"))
        else:
            image.save(images / name, quality=95)
    write_text_files(root / "Anno" if official_folders else root, root / "Eval" if official_folders else root)
    return root


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))


# -- parsing (no Pillow needed) ---------------------------------------------------------------------------------
def test_attributes_map_minus_one_to_zero(tmp_path: Path) -> None:
    write_text_files(tmp_path, tmp_path)
    files, labels = celeba_data.parse_attributes(tmp_path / celeba_data.ATTR_FILE)
    assert files == FILES
    assert labels.dtype == np.uint8 and labels.shape == (N, 40)
    np.testing.assert_array_equal(labels, (SIGNS == 1).astype(np.uint8))
    assert labels[0, :5].tolist() == [int(s == 1) for s in SIGNS[0, :5]]


def test_partition_is_joined_by_file_name(tmp_path: Path) -> None:
    write_text_files(tmp_path, tmp_path)
    lines = (tmp_path / celeba_data.PARTITION_FILE).read_text().splitlines()
    (tmp_path / celeba_data.PARTITION_FILE).write_text("\n".join(reversed(lines)) + "\n")  # order must not matter
    (tmp_path / "img_align_celeba").mkdir()
    annotations = celeba_data.read_annotations(celeba_data.find_layout(tmp_path))
    np.testing.assert_array_equal(annotations.partition, PARTITION)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda lines: ["many", *lines[1:]], "count on line 1"),
        (lambda lines: [lines[0], lines[1].replace("Young", "Old"), *lines[2:]], "40 CelebA attributes"),
        (lambda lines: [*lines[:3], lines[3].replace("-1", " 0", 1).replace(" 1", " 0", 1), *lines[4:]], "line 4"),
        (lambda lines: [*lines[:4], lines[4].rsplit(" ", 1)[0], *lines[5:]], "line 5 has 40 fields"),
        (lambda lines: [*lines[:5], lines[5].replace("-1", "x", 1), *lines[6:]], "must be -1 or 1"),
        (lambda lines: lines[:-1], "announces 8 images but 7 rows"),
    ],
)
def test_bad_attribute_files_name_the_problem(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    write_text_files(tmp_path, tmp_path)
    path = tmp_path / celeba_data.ATTR_FILE
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    with pytest.raises(DataSourceError, match=message):
        celeba_data.parse_attributes(path)


def test_bad_partition_files(tmp_path: Path) -> None:
    write_text_files(tmp_path, tmp_path)
    (tmp_path / "img_align_celeba").mkdir()
    path = tmp_path / celeba_data.PARTITION_FILE
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:2], "000003.jpg 3", *lines[3:]]))
    with pytest.raises(DataSourceError, match=r"line 3 must be '<file> 0\|1\|2'"):
        celeba_data.parse_partition(path)
    path.write_text("\n".join(lines[:-1]))
    with pytest.raises(DataSourceError, match=r"no partition for 1 annotated image.*000008\.jpg"):
        celeba_data.read_annotations(celeba_data.find_layout(tmp_path))


def test_missing_parts_say_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="not a directory"):
        celeba_data.find_layout(tmp_path / "absent")
    with pytest.raises(DataSourceError, match=r"no image folder.*img_align_celeba.*mmlab"):
        celeba_data.find_layout(tmp_path)
    (tmp_path / "img_align_celeba").mkdir()
    with pytest.raises(DataSourceError, match=r"no list_attr_celeba\.txt.*Anno/list_attr_celeba\.txt"):
        celeba_data.find_layout(tmp_path)
    with pytest.raises(DataSourceError, match="pass its folder as data_dir"):
        celeba.CelebABenchmark("quick")
    with pytest.raises(ValueError, match="choose from paper, quick"):
        celeba.CelebABenchmark("fast", data_dir=str(tmp_path))


def test_missing_pillow_gives_the_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_text_files(tmp_path, tmp_path)
    (tmp_path / "img_align_celeba").mkdir()
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"pip install 'taskbalance\[celeba\]'"):
        celeba_data.load_celeba(tmp_path, "test", cache=False)


# -- metrics and losses by hand ---------------------------------------------------------------------------------
def test_per_attribute_accuracy_by_hand() -> None:
    evaluator = celeba.CelebAEvaluator(("a", "b", "c"))
    # batch 1: predictions (logit > 0) a: 1 0, b: 1 1, c: 0 0 against targets a: 1 1, b: 0 1, c: 0 0
    evaluator.update([torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0]), torch.tensor([-2.0, 0.0])],
                     torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))  # fmt: skip
    # batch 2: one sample, predictions a: 0, b: 0, c: 1 against targets a: 0, b: 1, c: 1
    evaluator.update([torch.tensor([-0.1]), torch.tensor([-5.0]), torch.tensor([0.2])], torch.tensor([[0.0, 1.0, 1.0]]))
    metrics = evaluator.compute()
    # a: right, wrong, right → 2/3; b: wrong, right, wrong → 1/3; c: right, right (0 is not > 0), right → 1
    assert metrics == pytest.approx({"acc/a": 2 / 3, "acc/b": 1 / 3, "acc/c": 1.0})
    assert celeba.mean_error(metrics) == pytest.approx(1 - (2 / 3 + 1 / 3 + 1) / 3)
    with pytest.raises(RuntimeError, match="before any update"):
        celeba.CelebAEvaluator().compute()
    with pytest.raises(ValueError, match="no 'acc/"):
        celeba.mean_error({"loss": 1.0})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bce_per_attribute_by_hand(dtype: torch.dtype) -> None:
    # BCE with logits: softplus(x) − x·y; attribute 1: x = 2, −1 with y = 1, 1; attribute 2: x = 0, 3 with y = 0, 1
    losses = celeba.attribute_losses(
        [torch.tensor([2.0, -1.0], dtype=dtype), torch.tensor([0.0, 3.0], dtype=dtype)],
        torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
    )
    first = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0))) / 2
    second = (math.log(2.0) + math.log1p(math.exp(-3.0))) / 2
    assert losses.dtype == dtype
    torch.testing.assert_close(losses, torch.tensor([first, second], dtype=dtype))


def test_metrics_and_protocols_declared() -> None:
    bench = celeba.CelebABenchmark
    assert bench.tasks == celeba_data.ATTRIBUTES and len(bench.tasks) == 40
    assert [m.name for m in bench.metrics] == [f"acc/{a}" for a in celeba_data.ATTRIBUTES]
    assert all(m.higher_is_better and m.task == m.name[4:] for m in bench.metrics)
    paper, quick = bench.protocols["paper"], bench.protocols["quick"]
    assert (paper.epochs, paper.batch_size, paper.lr, paper.reduced) == (15, 256, 3e-4, False)
    assert quick.reduced and quick.train_size == 1024
    # every protocol fixes its input size, trunk width and evaluation subset
    assert (paper.image_size, paper.width, paper.eval_size) == (64, 64, None)
    assert (quick.image_size, quick.width, quick.eval_size) == (32, 8, 256)


# -- the model --------------------------------------------------------------------------------------------------
def test_trunk_is_resnet18_without_its_classifier() -> None:
    model = CelebAResNet()
    # torchvision's resnet18 (11,689,512) minus its fc (512·1000 + 1000) with the 7×7 stem (9,408) swapped for 3×3
    assert sum(p.numel() for p in model.encoder.parameters()) == 11_689_512 - 513_000 - 9_408 + 1_728
    assert len(model.heads) == 40 and model.features == 2048
    features, outputs = model.eval()(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, 2048) and len(outputs) == 40 and outputs[0].shape == (2,)
    small = CelebAResNet(n_tasks=3, width=4)
    assert small(torch.randn(2, 3, 32, 32))[0].shape == (2, 128)
    with pytest.raises(ValueError, match="four counts"):
        CelebAResNet(blocks=(2, 2))
    with pytest.raises(ValueError, match="width"):
        CelebAResNet(width=0)


# -- images, the cache and the benchmark (Pillow) ---------------------------------------------------------------
@pytest.mark.parametrize("official_folders", [False, True])
def test_split_images_and_labels_follow_the_partition(tmp_path: Path, official_folders: bool) -> None:
    root = write_release(tmp_path / "celeba", official_folders=official_folders)
    for split, code in celeba_data.PARTITIONS.items():
        data = celeba_data.load_celeba(root, split, image_size=16)
        rows = np.flatnonzero(code == PARTITION)
        assert data.images.shape == (rows.size, 16, 16, 3) and data.images.dtype == np.uint8
        np.testing.assert_array_equal(data.labels, (SIGNS[rows] == 1).astype(np.uint8))
        # JPEG keeps a solid colour to within a few levels; resizing a solid image keeps it solid
        error = np.abs(data.images.astype(int) - COLOURS[rows][:, None, None, :].astype(int))
        assert error.max() <= 4
    assert celeba_data.load_celeba(root, "train", image_size=16, limit=2).labels.shape == (2, 40)


def test_png_release_decodes_exactly_and_resizes_bilinear(tmp_path: Path) -> None:
    image_module = pytest.importorskip("PIL.Image")
    root = write_release(tmp_path, png=True)
    data = celeba_data.load_celeba(root, "test", image_size=8, cache=False)
    np.testing.assert_array_equal(data.images, np.broadcast_to(COLOURS[PARTITION == 2][:, None, None], (2, 8, 8, 3)))
    # a two-colour image: left half red, right half blue; resized, the edges keep their colours
    pixels = np.zeros((24, 20, 3), np.uint8)
    pixels[:, :10, 0], pixels[:, 10:, 2] = 255, 255
    image_module.fromarray(pixels).save(root / "img_align_celeba_png" / "000006.png")
    resized = celeba_data.load_celeba(root, "test", image_size=8, cache=False).images[0]
    assert (resized[:, 0] == [255, 0, 0]).all() and (resized[:, -1] == [0, 0, 255]).all()


def test_missing_image_names_the_file(tmp_path: Path) -> None:
    root = write_release(tmp_path)
    (root / "img_align_celeba" / "000004.jpg").unlink()
    with pytest.raises(DataSourceError, match=r"cannot decode .*000004\.jpg"):
        celeba_data.load_celeba(root, "val", cache=False)
    assert not list(cache.cache_dir().iterdir())


def test_resized_arrays_are_cached_and_rebuilt_when_annotations_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_release(tmp_path)
    first = celeba_data.load_celeba(root, "train", image_size=12)
    assert len(list(cache.cache_dir().glob("celeba-*-train-12px-all.npz"))) == 1

    def no_decode(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(celeba_data, "decode_images", no_decode)
    np.testing.assert_array_equal(celeba_data.load_celeba(root, "train", image_size=12).images, first.images)
    flipped = SIGNS.copy()
    flipped[0, 0] *= -1
    write_text_files(root, root, flipped)  # new annotations → a new cache key → decoding again
    with pytest.raises(AssertionError, match="cache should have been used"):
        celeba_data.load_celeba(root, "train", image_size=12)


def test_loader_batches_shapes_and_determinism(tmp_path: Path) -> None:
    bench = celeba.CelebABenchmark("quick", data_dir=str(write_release(tmp_path)))
    batches = list(bench.loader("train", batch_size=2, shuffle=False, generator=torch.Generator().manual_seed(0)))
    assert [len(b[1]) for b in batches] == [2, 2]
    images, labels = bench.to_device(batches[0], torch.device("cpu"))
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert labels.shape == (2, 40) and labels.dtype == torch.float32
    train_rows = np.flatnonzero(PARTITION == 0)
    expected = torch.from_numpy((SIGNS[train_rows] == 1).astype(np.float32))
    torch.testing.assert_close(torch.cat([b[1] for b in batches]), expected)

    def order(seed: int) -> list[list[float]]:
        loader = bench.loader("train", batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(seed))
        return torch.cat([images[:, 0, 0, 0] for images, _ in loader]).tolist()

    assert order(1) == order(1)
    assert sorted(order(1)) == sorted(order(2))
    assert any(order(1) != order(s) for s in range(2, 6))
    with pytest.raises(ValueError, match="batch_size"):
        bench.loader("val", batch_size=0, shuffle=False, generator=torch.Generator())


def test_one_training_step_through_a_balancer(tmp_path: Path) -> None:
    bench = celeba.CelebABenchmark("quick", data_dir=str(write_release(tmp_path)))
    torch.manual_seed(0)
    model = bench.model()
    balancer = tb.make("ew", n_tasks=bench.n_tasks)
    optimizer = bench.optimizer([*model.parameters(), *balancer.parameters()])
    inputs, targets = bench.to_device(
        next(iter(bench.loader("train", batch_size=5, shuffle=False, generator=torch.Generator()))), torch.device("cpu")
    )
    features, outputs = model(inputs)
    losses = bench.losses(outputs, targets)
    assert losses.shape == (40,) and torch.isfinite(losses).all()
    before = [p.detach().clone() for p in model.parameters()]
    balancer.backward(losses, shared_params=model.encoder.parameters(), features=features)
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.heads.parameters())
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True) if p.grad is not None)
    model.eval()
    evaluator = bench.evaluator()
    with torch.no_grad():
        for batch in bench.loader("test", batch_size=4, shuffle=False, generator=torch.Generator()):
            x, y = bench.to_device(batch, torch.device("cpu"))
            evaluator.update(model(x)[1], y)
    metrics = evaluator.compute()
    assert list(metrics) == [m.name for m in bench.metrics]
    assert all(value in (0.0, 0.5, 1.0) for value in metrics.values())  # two test images
