"""The HTML evaluation report: its content without a browser, and a real render in headless Chromium (the
`chromium` fixture, conftest.py: installed by the set-up step tests/setup_browser.sh)."""

from __future__ import annotations

import base64
import html
import io
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_run
from PIL import Image

from distributed_anomaly import engine, report, rundir
from distributed_anomaly.data.loader import load_masks
from distributed_anomaly.data.mvtec import Record, load_dataset, records_of_split
from distributed_anomaly.evaluation import compute_metrics
from distributed_anomaly.postprocess import no_threshold_postprocessor
from distributed_anomaly.training import evaluate_run

GALLERIES = ("missed", "false-alarms", "top-defects")
SECTIONS = ("summary", "metrics", "curves", "scores", *GALLERIES)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--window-size=1280,4000",
)


# --------------------------------------------------------------------------------------------------------
# a parsed page
# --------------------------------------------------------------------------------------------------------


class Page(HTMLParser):
    """What the tests look at: section ids, images, links, tiles per gallery, per-defect table rows."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.ids: list[str] = []
        self.imgs: list[dict] = []
        self.hrefs: list[str] = []
        self.tiles: dict[str, list[int]] = {g: [] for g in GALLERIES}
        self.badges: list[str] = []
        self.rows: dict[str, list[str]] = {}
        self._row: str | None = None
        self._cell: list[str] | None = None
        self._badge = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a)
        if "href" in a:
            self.hrefs.append(a["href"])
        if "src" in a and tag != "img":
            self.hrefs.append(a["src"])
        if tag == "figure" and "tile" in a.get("class", ""):
            self.tiles[a["data-gallery"]].append(int(a["data-index"]))
        if tag == "span" and "badge" in a.get("class", "").split():
            self._badge = True
        if tag == "tr" and "data-defect" in a:
            self._row = a["data-defect"]
            self.rows[self._row] = []
        if tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._row is not None:
            self.rows[self._row].append("".join(self._cell).strip())
            self._cell = None
        if tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._badge:
            self.badges.append(data)
            self._badge = False


def decode_data_uri(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,"), src[:40]
    img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
    img.load()
    return img


def check_self_contained(page: Page) -> None:
    """No network: every image is an inline PNG, every link an in-page anchor, no script or stylesheet link."""
    assert page.imgs and all(i["src"].startswith("data:image/png;base64,") for i in page.imgs)
    assert all(h.startswith("#") for h in page.hrefs), [h for h in page.hrefs if not h.startswith("#")]
    for pattern in (r"https?://", r"<script", r"<link", r"<iframe", r"@import", r"url\(", r"src=\"//"):
        assert not re.search(pattern, page.text, re.IGNORECASE), pattern
    for i in page.imgs:
        img = decode_data_uri(i["src"])
        assert img.format == "PNG"
        assert (int(i["width"]), int(i["height"])) == img.size
        if "plot" not in i.get("class", ""):
            assert max(img.size) <= 256


# --------------------------------------------------------------------------------------------------------
# fixtures: the session's PADIM run (a private copy) and its scored test split
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, padim_run: Path) -> Path:
    """A copy of the shared PADIM run (MobileNetV2, 128 px): the report is written into it."""
    return copy_run(padim_run, tmp_path_factory.mktemp("report") / "run")


@pytest.fixture(scope="module")
def scored(run: Path):
    cfg, model, post = rundir.load_model(run)
    _, _, info = rundir.load_config(run)
    test = records_of_split(load_dataset(info["data"]), "test")
    maps = engine.anomaly_maps(model, test, cfg.image_size, progress=False)
    masks = load_masks(test, cfg.image_size)
    return test, maps, masks, post


@pytest.fixture(scope="module")
def run_report(run: Path) -> Path:
    """What `evaluate --run RUN --report` writes."""
    return Path(evaluate_run(run, report=True)["report"])


def _independent_galleries(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, list[int]]:
    """The expected tiles, from first principles (not through report.gallery_indices)."""
    idx = range(len(labels))
    missed = sorted((i for i in idx if labels[i] and scores[i] < threshold), key=lambda i: scores[i])
    false = sorted((i for i in idx if not labels[i] and scores[i] >= threshold), key=lambda i: -scores[i])
    top = sorted((i for i in idx if labels[i]), key=lambda i: -scores[i])
    return {"missed": missed, "false-alarms": false, "top-defects": top}


# --------------------------------------------------------------------------------------------------------
# pure selection logic
# --------------------------------------------------------------------------------------------------------


def test_gallery_selection_and_per_defect_counts() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 1], bool)
    scores = np.array([1.0, 5.0, 9.0, 2.0, 8.0, 3.0, 7.0])
    g = report.gallery_indices(labels, scores, 4.0, limit=3)
    assert g == {"missed": ([3, 5], 2), "false-alarms": ([2, 1], 2), "top-defects": ([4, 6, 5], 4)}
    g = report.gallery_indices(labels, scores, None, limit=3)
    assert g == {"missed": ([3, 5, 6], 4), "false-alarms": ([2, 1, 0], 3), "top-defects": ([4, 6, 5], 4)}

    defects = ["good", "good", "good", "crack", "crack", "oil", "oil"]
    records = [Record(f"/x/{d}/{i}.png", "test", int(d != "good"), d, "c") for i, d in enumerate(defects)]
    assert report.per_defect_counts(records, scores, 4.0) == {
        "crack": {"count": 2, "detected": 1, "missed": 1},
        "oil": {"count": 2, "detected": 1, "missed": 1},
        "good": {"count": 3, "false_alarms": 2},
    }
    assert report.per_defect_counts(records, scores, None)["crack"] == {"count": 2, "detected": None, "missed": None}


# --------------------------------------------------------------------------------------------------------
# content, no browser
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_report_content_with_misses_and_false_alarms(scored, run: Path, tmp_path: Path, monkeypatch) -> None:
    test, maps, masks, post = scored
    # Swap two maps so the split has both a missed defect and a false alarm (the demo model makes neither).
    labels = np.array([r.label for r in test], bool)
    maps = maps.copy()
    good, bad = int(np.flatnonzero(~labels)[0]), int(np.flatnonzero(labels)[0])
    maps[[good, bad]] = maps[[bad, good]]
    metrics = compute_metrics(maps, test, masks, post)
    monkeypatch.setattr(report, "MAX_TILES", 5)
    path = report.write_report(run, test, maps, masks, post, metrics, out_path=tmp_path / "r.html")
    text = path.read_text(encoding="utf-8")
    page = Page(text)

    assert set(SECTIONS) <= set(page.ids)
    assert "mobilenet_v2" in text and "128 px" in text
    assert html.escape(report.THRESHOLD_SOURCES[post.threshold_source]) in text
    scores = maps.reshape(len(maps), -1).max(1)
    expected = _independent_galleries(labels, scores, post.image_threshold)
    assert expected["missed"] and expected["false-alarms"]
    for g in GALLERIES:
        assert page.tiles[g] == expected[g][:5], g
    assert f"showing 5 of {labels.sum()}" in text  # top-defects is capped
    assert page.badges.count("missed") == len(expected["missed"])
    assert page.badges.count("false alarm") == len(expected["false-alarms"])

    # per-defect table: detected + missed = count, and they match the threshold
    for d, info in metrics["per_defect"].items():
        cells = page.rows[d]
        sel = np.array([r.defect == d for r in test])
        assert int(cells[1]) == info["count"] == sel.sum()
        assert int(cells[3]) == int((scores[sel] >= post.image_threshold).sum())
        assert int(cells[3]) + int(cells[4]) == info["count"]
    assert f"{len(expected['false-alarms'])} false alarm" in " ".join(page.rows["good"])

    check_self_contained(page)
    assert sum("plot" in i.get("class", "") for i in page.imgs) == 2
    assert path.stat().st_size < 1_000_000


@pytest.mark.slow
def test_report_without_threshold_ranks_by_score_and_says_so(scored, run: Path, tmp_path: Path) -> None:
    test, maps, masks, _ = scored
    post = no_threshold_postprocessor(maps)
    metrics = compute_metrics(maps, test, masks, post)
    page = Page(report.write_report(run, test, maps, masks, post, metrics, tmp_path / "r.html").read_text())
    assert "No threshold" in page.text and "rank by score only" in page.text
    assert "Lowest-scoring defects" in page.text and "Highest-scoring normal images" in page.text
    assert not {"missed", "false alarm", "detected"} & set(page.badges)
    labels = np.array([r.label for r in test], bool)
    scores = maps.reshape(len(maps), -1).max(1)
    anomalous = sorted(np.flatnonzero(labels), key=lambda i: scores[i])
    assert page.tiles["missed"] == anomalous[: report.MAX_TILES]
    assert page.tiles["false-alarms"] == sorted(np.flatnonzero(~labels), key=lambda i: -scores[i])[: report.MAX_TILES]
    assert all(cells[3] == "—" for d, cells in page.rows.items() if d != "good")
    check_self_contained(page)


@pytest.mark.slow
@pytest.mark.parametrize("keep", ["normal", "anomalous"])
def test_single_class_test_split_still_renders(scored, tmp_path: Path, keep: str) -> None:
    test, maps, masks, post = scored
    idx = [i for i, r in enumerate(test) if r.label == (keep == "anomalous")][:4]
    records = [test[i] for i in idx]
    metrics = compute_metrics(maps[idx], records, masks[idx], post)
    # No run directory: the header just has less in it; masks=None loads them from the records.
    path = report.write_report(tmp_path / "no_run", records, maps[idx], None, post, metrics)
    assert path == tmp_path / "no_run" / report.REPORT
    page = Page(path.read_text())
    assert set(SECTIONS) <= set(page.ids)
    assert "image-level curves need both normal and anomalous test images" in page.text
    if keep == "normal":
        assert "No anomalous images in the test split." in page.text
        assert page.tiles["missed"] == page.tiles["top-defects"] == []
    else:
        assert "No normal images in the test split." in page.text
        assert len(page.tiles["top-defects"]) == 4
    check_self_contained(page)


@pytest.mark.slow
def test_evaluate_with_report_writes_run_dir_report(run_report: Path, run: Path, scored) -> None:
    test, maps, _, post = scored
    assert run_report == run / "report.html"
    page = Page(run_report.read_text())
    labels = np.array([r.label for r in test], bool)
    expected = _independent_galleries(labels, maps.reshape(len(maps), -1).max(1), post.image_threshold)
    assert page.tiles == {g: v[: report.MAX_TILES] for g, v in expected.items()}
    check_self_contained(page)


# --------------------------------------------------------------------------------------------------------
# a real browser
# --------------------------------------------------------------------------------------------------------


def run_chromium(commands: dict[str, list[str]]) -> dict[str, tuple[str, str]]:
    """Run headless Chromium commands side by side; {name: (stdout, stderr)}, each asserted to exit 0."""
    procs = {
        k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k, c in commands.items()
    }
    out = {}
    try:
        for k, p in procs.items():
            out[k] = p.communicate(timeout=90)
            assert p.returncode == 0, f"chromium {k} failed ({p.returncode}): {out[k][1][-2000:]}"
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const probe = document.createElement("div");
  probe.id = "probe";
  probe.dataset.images = imgs.length;
  probe.dataset.broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).length;
  probe.dataset.overflow = document.documentElement.scrollWidth > window.innerWidth ? 1 : 0;
  probe.dataset.tiles = document.querySelectorAll("figure.tile").length;
  probe.dataset.sections = Array.from(document.querySelectorAll("section[id]")).map(s => s.id).join(" ");
  document.body.appendChild(probe);
});
</script>"""


@pytest.mark.slow
@pytest.mark.browser
def test_report_renders_in_headless_chromium(chromium: str, run_report: Path, tmp_path: Path) -> None:
    text = run_report.read_text(encoding="utf-8")
    # The report has no script; a copy gets a probe that records what the browser made of the images.
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    shot = tmp_path / "report.png"
    commands = {
        "screenshot": [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile1'}",
            f"--screenshot={shot}",
            run_report.resolve().as_uri(),
        ],
        "dom": [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile2'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe_page.resolve().as_uri(),
        ],
    }
    out = run_chromium(commands)

    dom = out["dom"][0]
    m = re.search(r'<div id="probe"([^>]*)>', dom)
    assert m, "the probe did not run: " + dom[-500:]
    attrs = dict(re.findall(r'data-([a-z]+)="([^"]*)"', m.group(1)))
    page = Page(text)
    assert int(attrs["images"]) == len(page.imgs) > 2
    assert attrs["broken"] == "0"
    assert attrs["overflow"] == "0", "the page scrolls sideways at 1280 px"
    assert int(attrs["tiles"]) == sum(len(v) for v in page.tiles.values()) > 0
    assert set(SECTIONS) <= set(attrs["sections"].split())

    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.shape == (4000, 1280)
    assert img.std() > 20, "screenshot looks blank"
    assert (img < 200).mean() > 0.05, "too little content drawn"
    assert img[:1000].std() > 10, "header and summary not drawn"
