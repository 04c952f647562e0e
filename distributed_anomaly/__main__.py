"""`python -m distributed_anomaly` is the same as the `distributed-anomaly` console script."""

from distributed_anomaly.cli import main

raise SystemExit(main())
