"""Run a real Celery worker of the node (thighnode.compute.run_worker, as `thighnode worker` does) whose model is
the phantoms' ground truth (tests the scale-out wiring, not the model; the demo bundle takes minutes per study
on the shared 2-core CI machine). A test helper script, not a package entry point.

    python tests/support/celery_worker.py CONFIG NAME     (THIGHNODE_HOME as for the node)

The studies are :func:`phantom_params` of :func:`study_uid` ``i``; the segmenter builds each phantom when its study
first arrives (the same deterministic phantom the test wrote).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
STUDY_ROOT = "1.2.826.0.1.3680043.8.498.26"


def study_uid(i: int) -> str:
    return f"{STUDY_ROOT}.{i + 1}"


def phantom_params(i: int):  # noqa: ANN201 - modelkit.phantom.PhantomParams
    from modelkit.phantom import PhantomParams

    return PhantomParams(seed=100 + i, sex="M" if i % 2 else "F", height_m=1.7, spacing_mm=(5.0, 4.0, 4.0),
                         fov_top_mm=-60.0, fov_bottom_mm=-260.0)


def write_studies(root: Path, n: int, tag: str) -> list[Path]:
    """Studies 0..n-1 (each its own patient, ``TN-<tag>-<i>``) as DICOM series under ``root``; their files."""
    from modelkit.phantom import generate_phantom, write_dicom_series

    files: list[Path] = []
    for i in range(n):
        uid = study_uid(i)
        files += write_dicom_series(
            generate_phantom(phantom_params(i)), root / str(i), patient_id=f"TN-{tag}-{i}", patient_name=f"Phantom^{tag}{i}",
            patient_sex="M" if i % 2 else "F", birth_date="19600101", height_m=1.7, study_uid=uid,
            series_uid=uid + ".1", frame_of_reference_uid=uid + ".2", study_date="20240612", accession=f"{tag}{i}",
        )
    return files


class PhantomTruth:
    """A segmenter returning the truth of the phantom its study was written from (built on first use)."""

    def __init__(self) -> None:
        from pipeline.labels import load_label_table

        self._labels = load_label_table()
        self._phantoms: dict = {}

    def segment(self, volume):  # noqa: ANN001, ANN201
        from modelkit.phantom import generate_phantom
        from tests.support.truth import TruthSegmenter

        uid = volume.study_instance_uid
        if uid not in self._phantoms:
            i = int(uid.rsplit(".", 1)[1]) - 1
            self._phantoms[uid] = generate_phantom(phantom_params(i), self._labels)
        return TruthSegmenter(self._phantoms, self._labels).segment(volume)


def main(config: str, name: str) -> None:
    import logging

    from thighnode.compute import run_worker
    from thighnode.settings import load_settings

    settings = load_settings(config)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s [%(processName)s]: %(message)s")
    logging.getLogger("celery").setLevel(logging.WARNING)
    run_worker(settings, lambda _s: PhantomTruth(), name=name)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    main(sys.argv[1], sys.argv[2])
