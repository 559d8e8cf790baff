"""The numerics version: which arithmetic a run's numbers come from.

An integer, bumped when an existing golden value of `tests/test_numerics.py` changes (a test
holds it to the goldens). Every run records it in config.json; `results`, resume and the grids
accept runs of the current version and refuse the others, naming what remakes them. A refactor
that keeps every golden keeps the version, and so keeps the evidence, with no retraining.
"""

NUMERICS_VERSION = 1
