"""Labelled cases from any data folder of a training settings file: a folder of NIfTI pairs
(:mod:`modelkit.nifti`) or a folder of DICOM case folders, each a CT series with one DICOM-SEG
(:mod:`modelkit.segimport`), told apart by what the folder holds.

``data_dirs``, ``val_dirs`` and ``calibration_dirs`` all take either kind; :func:`list_labelled_cases`
says which, and :func:`load_labelled_case` / :func:`load_case_volume` read a case the same way for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from modelkit.nifti import CT_SUFFIX, NiftiCase, NiftiError, list_nifti_cases
from pipeline.errors import PipelineError
from pipeline.labels import LabelTable

NIFTI = "nifti"
DICOM = "dicom"


class DataFolderError(PipelineError, ValueError):
    """A data folder of the training settings is missing or holds no labelled cases (message names the key
    and the folder). A PipelineError for the CLI, a ValueError for callers."""


@dataclass(frozen=True)
class LabelledCase:
    """One labelled CT: ``kind`` NIFTI (``nifti`` set) or DICOM (``folder`` is the case folder)."""

    name: str
    kind: str
    files: tuple[Path, ...]
    nifti: NiftiCase | None = None
    folder: Path | None = None


def _has_nifti(folder: Path) -> bool:
    if (folder / "imagesTr").is_dir() and (folder / "labelsTr").is_dir():
        return True
    return any(folder.glob(f"*{CT_SUFFIX}")) or any(folder.glob(f"*/*{CT_SUFFIX}"))


def folder_kind(folder: Path, key: str | None = None) -> str:
    """NIFTI or DICOM: what ``folder`` holds; DataFolderError naming ``key`` (the settings key, when the
    folder comes from one) when it is missing or holds neither NIfTI pairs nor DICOM case folders."""
    from modelkit.segimport import SegImportError, list_dicom_cases

    folder = Path(folder)
    prefix = f"{key}: " if key else ""
    if not folder.is_dir():
        raise DataFolderError(f"{prefix}folder {folder} does not exist" if key else
                              f"data folder {folder} does not exist")
    if _has_nifti(folder):
        return NIFTI
    try:
        list_dicom_cases(folder)
    except SegImportError:
        raise DataFolderError(
            f"{prefix}{folder} holds neither NIfTI pairs (*{CT_SUFFIX} + *_label.nii.gz, or imagesTr/ + labelsTr/) "
            "nor DICOM case folders (a CT series and one DICOM-SEG in each)"
        ) from None
    return DICOM


def dicom_case(folder: Path, name: str | None = None) -> LabelledCase:
    """A DICOM case folder (CT series + one SEG, files searched recursively) as a LabelledCase."""
    folder = Path(folder)
    files = tuple(sorted(f for f in folder.rglob("*") if f.is_file()))
    return LabelledCase(name or folder.name, DICOM, files, folder=folder)


def list_labelled_cases(folder: Path, key: str | None = None) -> list[LabelledCase]:
    """The labelled cases of one folder, NIfTI pairs or DICOM case folders (see :func:`folder_kind`)."""
    from modelkit.segimport import list_dicom_cases

    folder = Path(folder)
    prefix = f"{key}: " if key else ""
    if folder_kind(folder, key) == NIFTI:
        try:
            cases = list_nifti_cases(folder)
        except NiftiError as exc:
            raise DataFolderError(f"{prefix}{exc}") from None
        return [LabelledCase(c.name, NIFTI, tuple(c.files), nifti=c) for c in cases]
    return [dicom_case(d) for d in list_dicom_cases(folder)]


def list_folders(folders: Sequence[Path], key: str | None = None) -> list[LabelledCase]:
    """:func:`list_labelled_cases` of every folder, in order, each folder once."""
    return [c for d in dict.fromkeys(Path(f) for f in folders) for c in list_labelled_cases(d, key)]


def load_labelled_case(case: LabelledCase, labels: LabelTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(hu, label map, affine_lps)`` of a case."""
    from modelkit.nifti import load_nifti_pair
    from modelkit.segimport import load_dicom_case

    if case.kind == NIFTI:
        assert case.nifti is not None
        c = case.nifti
        return load_nifti_pair(c.ct_path, c.label_path, labels, label_names_path=c.label_names_path)
    assert case.folder is not None
    return load_dicom_case(case.folder, labels)


def load_case_volume(case: LabelledCase, labels: LabelTable):  # -> tuple[pipeline.types.Volume, np.ndarray]
    """A case as the Volume the Segmenter takes (the case name as its series, no DICOM identifiers) and
    its label map on the same grid."""
    from pipeline.types import Volume

    hu, truth, affine = load_labelled_case(case, labels)
    volume = Volume(hu=hu, affine_lps=affine, frame_of_reference_uid="", study_instance_uid="",
                    series_instance_uid=case.name, sop_class_uid="", sop_instance_uids=())
    return volume, truth
