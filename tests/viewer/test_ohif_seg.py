"""The study with our SEG, SR and PDF opened in a real viewer: OHIF (the prebuilt @ohif/app) in headless
Chromium, reading from Orthanc's DICOMweb (issue 24).

A 40 x 128 x 128 CT series, three BINARY SEGs of one label map (deflate, JPEG 2000, uncompressed; empty
frames omitted), an SR and a PDF are stored in Orthanc. For each SEG, OHIF opens the study, CT slices are
rendered without and with the SEG (double-click on its thumbnail, as a reader does), and the coloured pixels
the SEG adds are mapped back through cornerstone's own world-to-canvas transform onto the label map: they
must cover the labelled voxels of that slice (patient's right on the image's left), sit on that slice's
structure (no shift from omitted frames), be tinted with each segment's colour from the label table and be
absent on unlabelled slices. `make viewer-check` installs what it needs (Chromium, Orthanc's DICOMweb
plugin, node_modules, the OHIF build) and runs it.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.support.orthanc import DICOMWEB_PLUGIN, OrthancServer
from tests.support.viewer import OHIF_DIST, VIEWER_DIR, ViewerServer
from tests.support.viewer_study import EMPTY_SLICES, N_SLICES, SEG_TRANSFER_SYNTAXES, ViewerStudy, build_viewer_study

pytestmark = [pytest.mark.integration, pytest.mark.viewer]

CHROMIUM = "/usr/bin/chromium"
SLICES = (5, EMPTY_SLICES[1], EMPTY_SLICES[-1] + 1, 25, N_SLICES - 2)
"""A slice before the empty ones, an empty one, the first after them (the SEG has no frames in between),
one with both structures, an empty last one."""
OVERLAY_MIN_RGB_CHANGE = 40  # summed |difference| over R, G, B for a pixel to count as overlay
MIN_DICE = 0.9
MAX_CENTROID_ERROR_VOXELS = 0.5  # a one-slice shift moves the right structure by 2 rows
MIN_COLOUR_COSINE = 0.95  # the overlay's colour shift against the segment colour's direction (1: the same)


def _missing() -> str | None:
    """Why the check cannot run here (what `make viewer-check` installs), or None."""
    if not Path(CHROMIUM).is_file():
        return f"{CHROMIUM} is missing (apt-get install chromium; `make viewer-check` installs it)"
    if not Path(DICOMWEB_PLUGIN).is_file():
        return f"{DICOMWEB_PLUGIN} is missing (apt-get install orthanc-dicomweb; `make viewer-check` installs it)"
    if shutil.which("node") is None:
        return "node is not installed (Node.js 20; `make viewer-check` needs it)"
    if not (VIEWER_DIR / "node_modules" / "playwright-core").is_dir():
        return "tests/viewer/node_modules is missing (`make viewer-check` runs npm ci)"
    if not (OHIF_DIST / "index.html").is_file():
        return "tests/viewer/ohif-dist is missing (`make viewer-check` runs node fetch-ohif.mjs)"
    return None


def _world(study: ViewerStudy, k: int) -> list[list[float]]:
    """LPS positions (mm) of voxels (k, 0, 0), (k, 0, 1) and (k, 1, 0)."""
    affine = study.volume.affine_lps
    return [list(map(float, (affine @ np.array([k, r, c, 1.0]))[:3])) for r, c in ((0, 0), (0, 1), (1, 0))]


@pytest.fixture(scope="module")
def viewed(tmp_path_factory: pytest.TempPathFactory) -> tuple[ViewerStudy, dict[str, Any]]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("viewer")
    study = build_viewer_study(tmp / "study")
    with OrthancServer(tmp, dicomweb=True) as orthanc, ViewerServer(OHIF_DIST, orthanc.url) as viewer:
        for path in study.all_paths:
            orthanc.upload(path)
        request = {
            "url": viewer.url,
            "studyUID": study.study_uid,
            "chromium": CHROMIUM,
            "outDir": str(tmp / "shots"),
            "timeoutMs": 90000,
            "segs": [{"name": name, "seriesDescription": f"SEG {name}"} for name in SEG_TRANSFER_SYNTAXES],
            "slices": [
                {"k": k, "sopInstanceUID": study.volume.sop_instance_uids[k], "world": _world(study, k)}
                for k in SLICES
            ],
        }
        request_path = tmp / "request.json"
        request_path.write_text(json.dumps(request))
        started = time.monotonic()
        run = subprocess.run(
            ["node", str(VIEWER_DIR / "check.mjs"), str(request_path)],
            cwd=VIEWER_DIR, capture_output=True, text=True, timeout=600,
        )
        print(f"viewer check: {len(SEG_TRANSFER_SYNTAXES)} SEGs in OHIF in {time.monotonic() - started:.1f} s")
    assert run.returncode == 0, f"check.mjs failed (screenshots in {tmp / 'shots'}):\n{run.stderr[-4000:]}"
    return study, json.loads((tmp / "shots" / "result.json").read_text())


def _rgb(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _voxel_of_pixels(shot: dict[str, Any], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) voxel index under each canvas pixel's centre (-1 outside the image), from where
    cornerstone put voxels (k,0,0), (k,0,1), (k,1,0) on the canvas."""
    scale = float(shot["devicePixelRatio"])
    p0, p_col, p_row = (np.array(p, dtype=float) * scale for p in shot["worldToCanvas"])
    to_canvas = np.column_stack([p_row - p0, p_col - p0])  # d(x, y) / d(r, c)
    height, width = shot["canvasSize"][1], shot["canvasSize"][0]
    y, x = np.mgrid[0:height, 0:width] + 0.5
    rc = np.linalg.solve(to_canvas, np.stack([x.ravel() - p0[0], y.ravel() - p0[1]]))
    r, c = np.round(rc).astype(int).reshape(2, height, width)
    outside = (r < 0) | (r >= shape[0]) | (c < 0) | (c >= shape[1])
    return np.where(outside, -1, r), np.where(outside, -1, c)


def _compare(
    plain: dict[str, Any], overlay: dict[str, Any], sides: np.ndarray, colours: dict[int, tuple[int, int, int]]
) -> dict[str, Any]:
    """What the SEG added on one slice against ``sides`` (that slice's side map: 0 none, 1 right, 2 left),
    whose structures have the label table's ``colours`` by side."""
    k = plain["k"]
    np.testing.assert_allclose(overlay["worldToCanvas"], plain["worldToCanvas"], atol=0.5,
                               err_msg=f"slice {k}: the camera moved when the SEG was loaded")
    before, after = _rgb(plain["file"]), _rgb(overlay["file"])
    added = np.abs(after - before).sum(axis=-1) > OVERLAY_MIN_RGB_CHANGE
    r, c = _voxel_of_pixels(overlay, sides.shape)
    inside = r >= 0
    shown_side = np.zeros(added.shape, np.uint8)
    shown_side[inside] = sides[r[inside], c[inside]]
    expected = shown_side > 0
    dice = 2 * int((added & expected).sum()) / max(int(added.sum()) + int(expected.sum()), 1)
    errors, colour_match = {}, {}
    for side, name in ((1, "right"), (2, "left")):
        structure = sides == side
        if not structure.any():
            continue
        # Blending: overlay = (1 - alpha) * image + alpha * colour, so the change points from the image's
        # grey towards the segment's colour (RecommendedDisplayCIELabValue from the label table).
        drawn = added & (shown_side == side)
        if drawn.any():
            change = (after[drawn] - before[drawn]).mean(axis=0)
            towards = (np.array(colours[side], float) - before[drawn]).mean(axis=0)
            colour_match[name] = float(change @ towards / (np.linalg.norm(change) * np.linalg.norm(towards)))
        columns = np.nonzero(structure.any(axis=0))[0]
        # The overlay pixels over this structure's column range (patient right: low columns), in voxels.
        here = added & inside & (c >= columns.min() - 3) & (c <= columns.max() + 3)
        truth = np.argwhere(structure).mean(axis=0)
        seen = np.array([r[here].mean(), c[here].mean()]) if here.any() else np.array([np.inf, np.inf])
        errors[name] = (seen - truth).tolist()
    return {"k": k, "added": int(added.sum()), "expected": int(expected.sum()), "dice": dice,
            "centroid_error_voxels": errors, "colour_cosine": colour_match}


def _known_orthanc_limitation(error: str, compression: str, study: ViewerStudy) -> bool:
    """OHIF asks for the whole SEG instance without a transfer-syntax parameter, i.e. in Explicit VR Little
    Endian (PS3.18 8.7.3.5.2); Debian's Orthanc 1.10.1 cannot transcode JPEG 2000 ("Not implemented yet:
    Cannot transcode image", HTTP 500; with Debian's orthanc-gdcm 1.5 plugin loaded it crashes instead) and
    OHIF falls back to fetching the frames as stored. That one answer, for the JPEG 2000 SEG only, is the
    archive's limitation, not the SEG's; the overlay is still checked pixel by pixel."""
    series = study.seg_series_uids[compression]
    return compression == "JPEG2000" and re.fullmatch(
        rf'HTTP 500 \S+/series/{re.escape(series)}/instances/[0-9.]+ \(Accept: multipart/related; type="application/dicom"\)',
        error,
    ) is not None


def _problems(figure: dict[str, Any]) -> list[str]:
    """Why one slice's overlay does not match its truth (empty when it does)."""
    if figure["expected"] == 0:
        return [f"slice {figure['k']}: overlay where nothing is labelled"] if figure["added"] else []
    problems = []
    if figure["dice"] < MIN_DICE:
        problems.append(f"slice {figure['k']}: Dice {figure['dice']:.3f} < {MIN_DICE}")
    for side, error in figure["centroid_error_voxels"].items():
        if not np.all(np.abs(error) <= MAX_CENTROID_ERROR_VOXELS):
            problems.append(f"slice {figure['k']}: {side} structure off by {error} voxels (rows, columns)")
    for side, cosine in figure["colour_cosine"].items():
        if cosine < MIN_COLOUR_COSINE:
            problems.append(f"slice {figure['k']}: {side} structure not drawn in its segment's colour ({cosine:.3f})")
    return problems


@pytest.mark.parametrize("compression", list(SEG_TRANSFER_SYNTAXES))
def test_seg_overlay_in_ohif_falls_on_the_label_map(viewed: tuple[ViewerStudy, dict[str, Any]], compression: str) -> None:
    study, result = viewed
    seg = next(s for s in result["segs"] if s["name"] == compression)
    unexpected = [e for e in seg["errors"] if not _known_orthanc_limitation(e, compression, study)]
    assert not unexpected, f"{compression}: the page reported {unexpected}"
    assert [s["label"] for s in seg["segmentations"]] == [f"SEG {compression}"]
    assert sorted(g["label"] for g in seg["segmentations"][0]["segments"]) == ["Femur left", "Sartorius right"]
    sides = study.segmentation.side_map
    labels = study.segmentation.labels
    colours = {1: labels.by_key("sartorius").color, 2: labels.by_key("femur").color}
    swapped = {1: colours[2], 2: colours[1]}
    for plain, overlay in zip(seg["plain"], seg["overlay"], strict=True):
        k = plain["k"]
        sop = study.volume.sop_instance_uids[k]
        assert f"/instances/{sop}/" in overlay["shownImageId"], f"slice {k}: the viewer shows {overlay['shownImageId']}"
        assert plain["stable"] and overlay["stable"], f"slice {k}: the canvas never settled (blank or changing)"
        # Radiological display: +x (towards the patient's left) runs right on the canvas, +y (posterior) down,
        # so the patient's right is on the image's left whatever the mapping used below.
        origin, along_row, along_column = (np.array(p) for p in overlay["worldToCanvas"])
        assert along_row[0] - origin[0] > 0 and abs(along_row[1] - origin[1]) < 1e-3, overlay["worldToCanvas"]
        assert along_column[1] - origin[1] > 0 and abs(along_column[0] - origin[0]) < 1e-3, overlay["worldToCanvas"]
        figure = _compare(plain, overlay, sides[k], colours)
        print(compression, json.dumps(figure))
        assert not _problems(figure), f"{compression}: {_problems(figure)}: {figure}"
        if sides[k].any():
            # The same pixels against a left-right flip, the next slice or swapped segment colours must fail:
            # the check sees a flipped, one-slice-shifted or mislabelled overlay.
            assert _problems(_compare(plain, overlay, sides[k][:, ::-1], colours)), f"slice {k}: a flip would pass"
            assert _problems(_compare(plain, overlay, sides[k + 1], colours)), f"slice {k}: a shift would pass"
            assert _problems(_compare(plain, overlay, sides[k], swapped)), f"slice {k}: swapped colours would pass"


def test_sr_and_pdf_are_listed_in_ohif(viewed: tuple[ViewerStudy, dict[str, Any]]) -> None:
    study, result = viewed
    for seg in result["segs"]:
        listed = {(s["modality"], s["seriesDescription"]) for s in seg["listed"]}
        sr = ("SR", str(_header(study.sr_path).SeriesDescription))
        pdf = ("DOC", str(_header(study.pdf_path).SeriesDescription))
        assert sr in listed and pdf in listed, f"OHIF lists {sorted(listed)}"
        text = seg["studyBrowserText"]
        for modality, description in (sr, pdf):
            assert modality in text and description[:20] in text, f"study browser shows:\n{text}"


def _header(path: Path) -> Any:
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)

