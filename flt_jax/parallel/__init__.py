"""Device mesh, logical-axis sharding and multi-host helpers (between model/data and
train/eval/run: nothing here imports train, eval or the run layer)."""
