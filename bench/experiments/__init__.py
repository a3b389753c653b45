"""The paper's claims in miniature: controlled CPU experiments with tiny teachers and students.

``python -m bench.experiments.run_all`` (``make experiments``) runs every experiment and writes
``bench/results/experiments/``:

- ``fixed_pattern``: shift equivariance removes a teacher's fixed-pattern noise (METHOD.md §4).
- ``balanced_summary``: the balanced angular summary loss evens out teachers of unequal dispersion.
- ``resolution_consistency``: one student trained on both resolution partitions matches every
  teacher at every resolution (no "mode switching").

Each module has ``run(out_dir, budget) -> dict`` and a ``Budget`` dataclass whose ``smoke()`` is the
seconds-long budget of the CI test (tests/test_experiments.py).
"""
