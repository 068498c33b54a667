"""A run folder's summary (:mod:`.summary`, the one place its numbers are computed), its ``results.json`` /
``results.csv`` (:mod:`.results`), and ``taskbalance report``'s markdown (:mod:`.markdown`) and plots
(:mod:`.plots`, which need matplotlib) read from the folder (:mod:`.folder`)."""
