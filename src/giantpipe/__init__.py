"""giantpipe: GPipe pipeline parallelism as a Hydra + Lightning experiment platform."""

__version__ = "0.1.0"
