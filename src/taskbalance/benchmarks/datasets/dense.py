"""Reading a preprocessed dense-prediction release (MTAN's ``.npy`` folders of NYUv2 and Cityscapes) and the
training augmentation the dense benchmarks share.

Layout: ``<root>/<split>/<modality>/<i>.npy`` for i = 0 … n−1, every modality holding the same numbers. Images
are (H, W, 3) floats, labels (H, W) integers in −1 … C−1 (−1 = ignored), depth (H, W, 1) or (H, W), normals
(H, W, 3); everything is validated and every error quotes the expected layout.

Augmentation (Nash-MTL's, after MTAN issue 34; the MTAN paper itself used none): random scale crop (scale 1, 1.2
or 1.5: crop a 1/scale window, resize it back, divide depth by the scale) and a horizontal flip with probability ½
that also negates the normals' x component. Deliberate difference from the reference: normals are resized with
nearest-neighbour sampling, like labels and depth; the reference's bilinear resize blends valid and missing
(zero) normals into short vectors, which the cosine loss then treats as valid, and it would also need
renormalising.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .mnist import DataSourceError

#: random-scale-crop scales (MTAN issue 34, used by Nash-MTL, CAGrad, FAMO)
SCALES: tuple[float, ...] = (1.0, 1.2, 1.5)
#: the channels each modality has on disk (HWC); label is (H, W)
_CHANNELS = {"image": 3, "depth": 1, "normal": 3}


# -- reading the release ---------------------------------------------------------------------------------------
class DenseFolder:
    """One split folder of a preprocessed release: ``<root>/<split>/<modality>/<i>.npy``, i = 0 … n−1.

    Args:
        root: the release's top folder (``data_dir``).
        split: "train" or "val" (the release's names).
        folders: modality kind ("image", "label", "depth", "normal") → its folder name in the release.
        n_classes: segmentation classes; labels must be integers in −1 … n_classes − 1.
        layout: the expected layout, quoted in every error.

    Raises:
        DataSourceError: a folder is missing, empty, or its files are not numbered 0 … n−1 in every modality.
    """

    def __init__(self, root: Path, split: str, folders: Mapping[str, str], n_classes: int, layout: str) -> None:
        self.path = root / split
        self.folders = dict(folders)
        self.n_classes = n_classes
        self.layout = layout
        counts = {}
        for kind, folder in self.folders.items():
            directory = self.path / folder
            if not directory.is_dir():
                raise DataSourceError(f"{directory} is missing. {layout}")
            names = {p.name for p in directory.glob("*.npy")}
            counts[kind] = len(names)
            expected = {f"{i}.npy" for i in range(len(names))}
            if not names or names != expected:
                stray = sorted(names - expected)[:3]
                raise DataSourceError(
                    f"{directory} must hold 0.npy … (n−1).npy"
                    + (f"; found {', '.join(stray)}" if stray else "; it is empty")
                    + f". {layout}"
                )
        if len(set(counts.values())) != 1:
            raise DataSourceError(f"{self.path}: the modalities hold different numbers of files {counts}. {layout}")
        self.size = next(iter(counts.values()))

    def __len__(self) -> int:
        return self.size

    def _array(self, kind: str, index: int) -> tuple[np.ndarray, Path]:
        path = self.path / self.folders[kind] / f"{index}.npy"
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise DataSourceError(f"{path}: not a readable .npy array ({error}). {self.layout}") from error
        if array.dtype.kind not in "fiu":
            raise DataSourceError(f"{path}: expected a numeric array, got dtype {array.dtype}. {self.layout}")
        return array, path

    def load(self, index: int) -> dict[str, Tensor]:
        """Sample ``index`` as tensors: image (3, H, W), depth (1, H, W), normal (3, H, W) float32; label (H, W)
        int64 (−1 = ignored)."""
        sample: dict[str, Tensor] = {}
        size: tuple[int, int] | None = None
        for kind in self.folders:
            array, path = self._array(kind, index)
            if kind == "label":
                if array.ndim != 2:
                    raise DataSourceError(f"{path}: a label map must be (H, W), got {array.shape}. {self.layout}")
                if not np.array_equal(array, np.round(array)) or array.min() < -1 or array.max() >= self.n_classes:
                    raise DataSourceError(
                        f"{path}: labels must be integers in −1 … {self.n_classes - 1} (−1 = ignored), found values "
                        f"in [{array.min()}, {array.max()}]. {self.layout}"
                    )
                tensor = torch.from_numpy(array.astype(np.int64))
            else:
                channels = _CHANNELS[kind]
                if kind == "depth" and array.ndim == 2:
                    array = array[..., None]
                if array.ndim != 3 or array.shape[-1] != channels:
                    raise DataSourceError(
                        f"{path}: {kind} must be (H, W, {channels}) channels-last, got {array.shape}. {self.layout}"
                    )
                tensor = torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 0), dtype=np.float32))
            hw = (int(tensor.shape[-2]), int(tensor.shape[-1]))
            if size is not None and hw != size:
                raise DataSourceError(f"{path}: size {hw} differs from the sample's image size {size}. {self.layout}")
            size = hw
            sample[kind] = tensor
        return sample


# -- augmentation ----------------------------------------------------------------------------------------------
def _resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    if mode == "bilinear":
        return F.interpolate(x[None], size=size, mode="bilinear", align_corners=True)[0]
    return F.interpolate(x[None], size=size, mode="nearest")[0]


def scale_crop_flip(sample: dict[str, Tensor], draws: Tensor) -> dict[str, Tensor]:
    """Random scale crop and horizontal flip of one sample, from four uniform draws in [0, 1).

    draws[0] picks the scale s in :data:`SCALES`, draws[1:3] the crop's top-left corner, draws[3] < ½ flips.
    The crop (H/s × W/s) is resized back to H × W (image bilinear, the rest nearest); depth is divided by s (the
    scene looks s times closer); a flip mirrors every map and negates the normals' x component.
    """
    height, width = sample["image"].shape[-2:]
    u = draws.tolist()
    scale = SCALES[min(int(u[0] * len(SCALES)), len(SCALES) - 1)]
    h, w = int(height / scale), int(width / scale)
    top, left = int(u[1] * (height - h + 1)), int(u[2] * (width - w + 1))
    flip = u[3] < 0.5
    out: dict[str, Tensor] = {}
    for kind, x in sample.items():
        crop = x[..., top : top + h, left : left + w]
        if kind == "label":
            resized = _resize(crop[None].float(), (height, width), "nearest")[0].long()
        else:
            resized = _resize(crop, (height, width), "bilinear" if kind == "image" else "nearest")
        if kind == "depth":
            resized = resized / scale
        if flip:
            resized = resized.flip(-1)
            if kind == "normal":
                resized[0] = -resized[0]
        out[kind] = resized
    return out
