"""The benchmarks' data: raw MNIST / Fashion-MNIST and MultiMNIST's construction, QM9's molecules, the dense
releases (NYUv2, Cityscapes) and CelebA, with the cache they share (:mod:`.cache`; ``TASKBALANCE_CACHE`` moves it)
and the checksum-verified download of last resort (:mod:`.download`).
"""

from ..extras import require

require("numpy", "tqdm", what="the benchmark datasets")
