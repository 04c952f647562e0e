"""distributed_anomaly: train, tune and serve visual anomaly detectors (PADIM, STFPM) on Ray."""

__version__ = "0.1.0"
