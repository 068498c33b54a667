"""Gradient-level balancing methods: each combines the per-task gradients (J or G) into one update."""
