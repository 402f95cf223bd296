"""Write a CT NIfTI (e.g. the real TotalSegmentator hip CT) as a DICOM CT Image Storage series.

The image is wrapped as a :class:`modelkit.phantom.Phantom` (axes (slice, row, column), LPS
affine) and written by :func:`modelkit.phantom.write_dicom_series` (PS3.3 A.3; one file per
slice, Explicit VR Little Endian by default), so the series carries the same modules as the
phantoms' series. ``reverse_slices`` writes the slices in the opposite array order and
``transpose_in_plane`` swaps rows and columns (other orientations of the same anatomy).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from modelkit.nifti import RAS_TO_LPS
from modelkit.phantom import Phantom, PhantomParams, write_dicom_series


def write_nifti_ct_as_dicom(
    nifti: Path,
    out_dir: Path,
    *,
    study_uid: str,
    patient_id: str,
    height_m: float,
    patient_sex: str = "M",
    reverse_slices: bool = False,
    transpose_in_plane: bool = False,
    transfer_syntax: str | None = None,
    study_date: str = "20240101",
) -> list[Path]:
    img = nib.load(str(nifti))
    affine = RAS_TO_LPS @ img.affine
    axis = int(np.argmax(np.abs(affine[2, :3])))  # the slice axis: most aligned with patient z
    in_plane = [a for a in (1, 0, 2) if a != axis][:2]  # rows then columns
    order = [axis, *in_plane]
    hu = np.transpose(np.asarray(img.dataobj, dtype=np.float32), order)
    lps = np.eye(4)
    lps[:3, :3] = affine[:3, order]
    lps[:3, 3] = affine[:3, 3]
    if reverse_slices:
        hu = hu[::-1]
        lps[:3, 3] += lps[:3, 0] * (hu.shape[0] - 1)
        lps[:3, 0] *= -1
    if transpose_in_plane:  # rows <-> columns: another ImageOrientationPatient for the same anatomy
        hu = hu.transpose(0, 2, 1)
        lps[:3, [1, 2]] = lps[:3, [2, 1]]
    image = Phantom(
        hu=np.ascontiguousarray(hu), labels=np.zeros(hu.shape, np.uint8), affine_lps=lps,
        params=PhantomParams(seed=0, sex=patient_sex, height_m=height_m), midline_x_mm=0.0,
    )
    return write_dicom_series(
        image, out_dir, patient_id=patient_id, patient_name="Real^HipCT", patient_sex=patient_sex,
        height_m=height_m, study_uid=study_uid, series_uid=study_uid + ".1", frame_of_reference_uid=study_uid + ".2",
        study_description="CT hip", series_description="Hip CT (TotalSegmentator example)",
        transfer_syntax=transfer_syntax, study_date=study_date,
    )
