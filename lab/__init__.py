"""The lab: synthetic data, training, objectives, scorers, scene features and held-out evaluation.

Installed as `tessera.lab`. It builds on `tessera.engines` (the product's model code), which
never imports it back; `tessera train` (`lab/cli.py`) is its command line.
"""
