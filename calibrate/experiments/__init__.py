"""Small, rerunnable measurements behind design choices stated in the README (python -m calibrate.experiments.X)."""
