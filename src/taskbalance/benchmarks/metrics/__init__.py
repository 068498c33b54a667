"""Metrics across benchmarks: Δm% and the mean rank (:mod:`.delta_m`), and the dense-prediction losses and
metrics (:mod:`.dense`)."""
