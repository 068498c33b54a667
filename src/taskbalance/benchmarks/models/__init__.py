"""The benchmarks' multi-task models: MultiLeNet (MultiMNIST), SegNet / MTAN (dense prediction), the MPNN (QM9)
and the ResNet-18 trunk (CelebA); each has an ``encoder`` shared by the tasks and one head per task."""
