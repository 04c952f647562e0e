"""Running Serve on a line: autoscaling, the application's own metrics, and the live operating point.

Pure rules first (target false-alarm thresholds, operating points, autoscale arguments), then one application on
the session's local Ray (one tiny PADIM, autoscale 1..2) shared by the Ray tests: its autoscaling config as Serve
holds it, a threshold changed live (CLI and Python) that changes the label of the same image on the same replica,
a per-request threshold, and the metrics scraped from the node's Prometheus endpoint, counted exactly.
"""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import SERVING_SIZE
from serving import deployed

from distributed_anomaly.config import TrainConfig
from distributed_anomaly.errors import UserError
from distributed_anomaly.fileio import read_json
from distributed_anomaly.postprocess import PostProcessor, fit_postprocessor, threshold_for_fpr
from distributed_anomaly.serve import live, operating, requests, settings

SIZE = SERVING_SIZE  # the image size of conftest.serving_irs
METRICS_TIMEOUT_S = 60.0  # Ray exports a worker's metrics every few seconds; a loaded machine is slower


# ------------------------------------------------------------------------------------------------------
# Pure logic, no Ray.


def test_threshold_for_fpr_counts_false_alarms() -> None:
    scores = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    for fpr, flagged in ((0.0, 0), (0.1, 1), (0.25, 2), (0.5, 5), (0.99, 9)):
        t = threshold_for_fpr(scores, fpr)
        assert sum(s >= t for s in scores) == flagged, fpr
    assert threshold_for_fpr(scores, 0.0) == np.nextafter(10.0, np.inf)
    with pytest.raises(ValueError, match="share"):
        threshold_for_fpr(scores, 1.0)
    with pytest.raises(ValueError, match="normal calibration images"):
        threshold_for_fpr([], 0.01)


def test_fit_postprocessor_target_fpr_is_stored_with_its_source() -> None:
    scores = np.arange(1.0, 21.0)
    maps = np.tile(scores[:, None, None], (1, 4, 4))
    post = fit_postprocessor(scores, np.zeros(20, bool), maps, target_fpr=0.1)
    assert post.threshold_source == "target_fpr" and post.extra["target_fpr"] == 0.1
    assert post.image_threshold == post.pixel_threshold == np.nextafter(18.0, np.inf)  # 2 of 20 flagged
    assert post.extra["normal_scores"] == [float(s) for s in scores]  # kept for live target_fpr
    assert PostProcessor.from_dict(post.to_dict()) == post
    with pytest.raises(ValueError, match="not both"):
        fit_postprocessor(scores, np.zeros(20, bool), maps, user_threshold=3.0, target_fpr=0.1)
    with pytest.raises(UserError, match="target-fpr"):
        TrainConfig(target_fpr=1.5)


def test_operating_points() -> None:
    post = PostProcessor(10.0, 9.0, 2.0, 20.0, "normal_3sigma", mask_peak_fraction=0.7, extra={"normal_scores": [4, 6]})
    assert operating.live_postprocessor(post, None) is post
    moved = operating.live_postprocessor(post, operating.OperatingPoint(threshold=12.0))
    assert (moved.image_threshold, moved.pixel_threshold, moved.threshold_source) == (12.0, 12.0, "live:threshold")
    assert moved.mask_peak_fraction == 0.0  # an explicit threshold says where to cut, as --threshold does
    both = operating.live_postprocessor(post, operating.OperatingPoint(threshold=12.0, pixel_threshold=11.0))
    assert both.pixel_threshold == 11.0
    sens = operating.live_postprocessor(post, operating.OperatingPoint(sensitivity=2.0))
    assert (sens.image_threshold, sens.pixel_threshold) == (6.0, 5.5)  # halfway to norm_min (2)
    assert sens.threshold_source == "normal_3sigma x sensitivity 2"
    fpr = operating.live_postprocessor(post, operating.OperatingPoint(target_fpr=0.0))
    assert fpr.image_threshold == np.nextafter(6.0, np.inf) and fpr.threshold_source == "live:target_fpr=0"
    req = operating.request_postprocessor(moved, 3.5)
    assert (req.image_threshold, req.pixel_threshold, req.threshold_source) == (3.5, 3.5, "request")
    with pytest.raises(UserError, match="no normal calibration scores"):
        operating.live_postprocessor(PostProcessor(1.0, 1.0, 0, 2, "user"), operating.OperatingPoint(target_fpr=0.1))

    names = ["washer", "tile"]
    assert operating.parse_user_config({"models": {"tile": {"threshold": "3"}}}, names) == {
        "tile": operating.OperatingPoint(threshold=3.0)
    }
    for bad, match in (
        ({"models": {"grid": {}}}, "not served"),
        ({"models": {"tile": {"treshold": 1}}}, "unknown operating point key"),
        ({"models": {"tile": {"threshold": 1, "target_fpr": 0.1}}}, "not both"),
        ({"models": {"tile": {"sensitivity": 0}}}, "sensitivity must be > 0"),
        ({"models": {"tile": {"threshold": "nan"}}}, "finite"),
        ({"thresholds": {}}, "unknown key"),
    ):
        with pytest.raises(UserError, match=match):
            operating.parse_user_config(bad, names)

    cfg = {"models": {"tile": {"target_fpr": 0.1, "sensitivity": 2.0}}}
    assert live.updated_user_config(cfg, "tile", {"threshold": 5.0}) == {
        "models": {"tile": {"threshold": 5.0, "sensitivity": 2.0}}  # a threshold replaces the target rate
    }
    assert live.updated_user_config(cfg, "tile", {}, reset=True) == {"models": {}}
    assert live.updated_user_config(cfg, "washer", {"sensitivity": 1.5})["models"]["washer"] == {"sensitivity": 1.5}
    with pytest.raises(UserError, match="sensitivity"):
        live.updated_user_config(cfg, "tile", {"sensitivity": -1.0})


def test_autoscale_arguments() -> None:
    cfg = settings.AppConfig.from_args({"models": "a", "autoscale": "1,4", "target_ongoing_requests": "6"})
    assert cfg.autoscale == (1, 4) and cfg.min_replicas == 1
    assert cfg.scaling_options() == {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 6.0}
    }
    assert settings.AppConfig.from_args(cfg.to_args()) == cfg  # what `serve deploy` gets builds the same app
    yaml_like = settings.AppConfig.from_args({"models": ["a"], "autoscale": [2, 3]})
    assert yaml_like.scaling_options()["autoscaling_config"]["target_ongoing_requests"] == 8.0  # max_batch_size
    assert settings.AppConfig(models=["a"], replicas=3).scaling_options() == {"num_replicas": 3}
    keyed = settings.AppConfig(models=["a"], api_key="s3cr3t")
    stored = keyed.to_args()["api_key"]  # what the deployed config (serve config, the dashboard) shows
    assert "s3cr3t" not in stored and stored.startswith("sha256:") and settings.hashed_api_key(stored) == stored
    requests.check_api_key(stored, {"x-api-key": "s3cr3t"})  # the ingress still takes the key itself
    requests.check_api_key(stored, {"authorization": "Bearer s3cr3t"})
    for wrong in ({"x-api-key": stored}, {"x-api-key": "s3cr3"}, {}):
        with pytest.raises(requests.Unauthorized):
            requests.check_api_key(stored, wrong)
    for bad in ("4,1", "0,2", "2", "a,b"):
        with pytest.raises(UserError, match="autoscale"):
            settings.parse_autoscale(bad)


def test_ingress_sends_the_model_size_and_answers_in_the_image_size() -> None:
    """The ingress shrinks a photo to the model's size once (uint8, to_tensor's filter, rounded): what reaches
    the model is the same tensor to within the rounding, and the answer keeps the image's own size."""
    import io

    import torch
    from PIL import Image

    from distributed_anomaly.data.images import shrink_to, to_tensor
    from distributed_anomaly.serve.requests import array_for_model, decode_for_model

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    small = shrink_to(photo, SIZE)
    assert small.shape == (SIZE, SIZE, 3) and small.dtype == np.uint8
    diff = (to_tensor(small, SIZE) - to_tensor(photo, SIZE)).abs() * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert float(diff.max()) <= 0.5 / 255 + 1e-6  # rounding to uint8, nothing else
    for crop in (photo[:40, :50], photo[:64, :64], photo[:32, :128]):  # no more pixels than the model's
        assert shrink_to(crop, SIZE) is crop  # sent as it is: to_tensor resizes it as in-process
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    sent, shape = decode_for_model(buf.getvalue(), None, SIZE)
    assert np.array_equal(sent, small) and shape == (300, 200)
    sent, shape = array_for_model(photo[..., 0], None, (32, 48))  # grey array, non-square model
    assert sent.shape == (32, 48, 3) and shape == (300, 200)


def test_grafana_dashboard_plots_our_metrics() -> None:
    """Every series the dashboard queries is one the application exports (Ray's `ray_` prefix and the
    Prometheus suffixes), and every metric has a panel."""
    import json

    from distributed_anomaly.serve import metrics

    text = (Path(__file__).resolve().parents[1] / "cluster" / "grafana_dashboard.json").read_text()
    dashboard = json.loads(text)
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    used = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in re.findall(r"ray_anomaly_\w+", exprs)}
    ours = {f"ray_{n}" for n in (metrics.REQUESTS, metrics.LATENCY, metrics.FLAGGED, metrics.SCORES, metrics.BATCH)}
    assert used == ours


# ------------------------------------------------------------------------------------------------------
# One application on the session's local Ray.


@pytest.fixture(scope="module")
def ir(serving_irs) -> Path:
    """PADIM on resnet18 (random seeded weights) at 64 px on the demo washer, exported fp32 (conftest's)."""
    return serving_irs["washer"]


@pytest.fixture(scope="module")
def images(demo_root: Path) -> list[bytes]:
    test = demo_root / "washer" / "test"
    paths = sorted((test / "good").glob("*.png"))[:2] + sorted(p for p in test.glob("*/*.png") if "good" not in str(p))
    return [p.read_bytes() for p in paths[:6]]


@pytest.fixture(scope="module")
def server(serve_http, ir):
    cfg = settings.AppConfig(
        models=[str(ir)],
        autoscale=(1, 2),
        target_ongoing_requests=100,  # never reached here: the replica the tests look at stays alone
        cpus_per_replica=1,
        max_batch_size=4,
    )
    with deployed(cfg, serve_http) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def sent(client, images) -> dict:
    """The requests the metrics test counts, sent first so that Ray exports them while the other tests run:
    every image for classification, one undecodable body (400) and one unknown model (404)."""
    answers = [client.post("/predict?task=classification", content=data).json() for data in images]
    assert client.post("/predict?task=classification", content=b"not an image").status_code == 400
    assert client.post("/predict?task=classification&model=nope", content=images[0]).status_code == 404
    return {"answers": answers, "ok": len(images), "flagged": sum(a["label"] == 1 for a in answers)}


def app_details(server) -> dict:
    from distributed_anomaly.serve.server import serve_client

    return serve_client().get_serve_details()["applications"][server.app_name]


def replica_ids(server) -> dict[str, list[str]]:
    deployments = app_details(server)["deployments"]
    return {name: sorted(r["replica_id"] for r in d["replicas"]) for name, d in deployments.items()}


@pytest.mark.ray
def test_autoscaling_config_is_deployed(server, sent) -> None:
    app = app_details(server)
    assert app["status"] == "RUNNING"
    assert app["deployed_app_config"]["args"]["autoscale"] == [1, 2]  # deployed from a config, as `serve deploy`
    auto = app["deployments"]["AnomalyModel"]["deployment_config"]["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == (1, 2, 100.0)


@pytest.mark.ray
def test_threshold_changed_live_changes_labels_without_restart(server, client, images, ir, sent) -> None:
    from distributed_anomaly.cli import main

    name = ir.name
    data = images[-1]
    before = client.post("/predict?task=segmentation", content=data).json()
    exported = read_json(ir / "postprocess.json")
    assert before["threshold"] == exported["image_threshold"]
    assert before["threshold_source"] == exported["threshold_source"] == "normal_3sigma"
    ids = replica_ids(server)

    above = before["raw_score"] + 1.0  # the same image, now below the threshold
    assert main(["serve-config", "set", "--model", name, "--threshold", str(above), "--app", server.app_name]) == 0
    after = client.post("/predict?task=segmentation", content=data).json()
    assert (after["label"], after["threshold"], after["threshold_source"]) == (0, above, "live:threshold")
    assert after["raw_score"] == before["raw_score"] and after["mask"] is not None
    below = before["raw_score"] - 1.0
    r = client.post(f"/predict?task=detection&threshold={below}", content=data).json()  # this request only
    assert (r["label"], r["threshold"], r["threshold_source"]) == (1, below, "request")
    assert client.post("/predict?threshold=abc", content=data).status_code == 400

    used = live.set_operating_point(server.app_name, name, {"target_fpr": 0.0})  # the Python route
    top = threshold_for_fpr(exported["extra"]["normal_scores"], 0.0)
    assert used["threshold"] == top and used["threshold_source"] == "live:target_fpr=0"
    fpr = client.post("/predict?task=detection", content=images[0]).json()
    assert fpr["threshold"] == top and fpr["label"] == int(fpr["raw_score"] >= top)

    with pytest.raises(UserError, match="not served"):
        live.set_operating_point(server.app_name, "nope", {"threshold": 1.0})
    assert main(["serve-config", "set", "--model", name, "--reset", "--app", server.app_name]) == 0
    again = client.post("/predict?task=segmentation", content=data).json()
    assert again == before  # back to the export's operating point, answer for answer
    assert replica_ids(server) == ids  # the same replicas throughout: reconfigured, never restarted


METRIC_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$")


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    """The node's Prometheus text as (name, labels, value) rows."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    rows = []
    for line in text.splitlines():
        m = METRIC_LINE.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m["labels"]))
            rows.append((m["name"], labels, float(m["value"])))
    return rows


def total(rows, name: str, replicas: set[str], **labels: str) -> float:
    return sum(
        v
        for n, lab, v in rows
        if n == name and lab.get("replica") in replicas and all(lab.get(k) == w for k, w in labels.items())
    )


@pytest.mark.ray
def test_metrics_are_exported_and_counted(ray_local, server, ir, sent) -> None:
    """After the `sent` requests (classification only; the other tests use the other tasks), the node's
    metrics endpoint shows exactly them, on this application's replicas."""
    port = next(n["MetricsExportPort"] for n in ray_local.nodes() if n["Alive"])
    ids = {i for group in replica_ids(server).values() for i in group}
    name, task = ir.name, "classification"
    want = {
        ("ray_anomaly_requests_total", "200"): sent["ok"],
        ("ray_anomaly_requests_total", "400"): 1,
    }
    deadline, rows = time.monotonic() + METRICS_TIMEOUT_S, []
    while time.monotonic() < deadline:
        rows = scrape(port)
        got = {k: total(rows, k[0], ids, model=name, task=task, status=k[1]) for k in want}
        if got == want and total(rows, "ray_anomaly_score_count", ids, model=name, task=task) == sent["ok"]:
            break
        time.sleep(1.0)
    assert {k: total(rows, k[0], ids, model=name, task=task, status=k[1]) for k in want} == want
    assert total(rows, "ray_anomaly_requests_total", ids, model="-", task=task, status="404") == 1
    assert total(rows, "ray_anomaly_images_flagged_total", ids, model=name, task=task) == sent["flagged"]
    assert total(rows, "ray_anomaly_score_count", ids, model=name, task=task) == sent["ok"]
    scores = sorted(a["score"] for a in sent["answers"])
    below_half = total(rows, "ray_anomaly_score_bucket", ids, model=name, task=task, le="0.5")
    assert below_half == sum(s <= 0.5 for s in scores)  # the histogram holds the answers' normalised scores
    assert total(rows, "ray_anomaly_request_latency_ms_count", ids, model=name, task=task) == sent["ok"] + 1
    batches = total(rows, "ray_anomaly_batch_size_count", ids, model=name)
    assert batches >= 1 and total(rows, "ray_anomaly_batch_size_bucket", ids, model=name, le="8.0") == batches
