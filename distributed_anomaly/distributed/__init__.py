"""Ray-backed fitting and scoring: same results as the in-process engine, on a cluster of any size.

    from distributed_anomaly.distributed import ray_session, fit_padim_ray, anomaly_maps_ray
    with ray_session(address):            # None: local single-node Ray; "auto" or HOST:PORT: join a cluster
        stats, info = fit_padim_ray(model, records, batch_size=32, workers=4, skip_corrupt=False)
        maps = anomaly_maps_ray(model, test_records, model.image_size, batch_size=32, workers=4)
"""

from distributed_anomaly.distributed.padim_fit import anomaly_maps_ray, fit_padim_ray
from distributed_anomaly.distributed.ray_setup import ensure_ray, ray_session

__all__ = ["anomaly_maps_ray", "ensure_ray", "fit_padim_ray", "ray_session"]
