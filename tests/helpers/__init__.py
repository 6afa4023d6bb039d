"""What several test modules share: tiny model configs and params (models.py), tiny runs
of the run layer and what they leave in a workdir (runs.py), and the marks of tests that
need an optional extra (extras.py). Test modules import from here, never from each other."""
