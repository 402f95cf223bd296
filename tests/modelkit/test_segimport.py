"""DICOM-SEG ground truth import (highdicom builds the SEG here; the importer uses pydicom only)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from modelkit.segimport import SegImportError, match_segments, rasterize_seg
from pipeline.labels import load_label_table


def _ct_series(shared_data: Path, n: int = 4) -> list[pydicom.Dataset]:
    template = pydicom.dcmread(shared_data / "reference-seg-sr" / "highdicom" / "ct_image.dcm")
    series_uid = generate_uid()
    out = []
    for k in range(n):
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-158.0, -179.0, -75.0 + 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        out.append(ds)
    return out


def _affine(cts: list[pydicom.Dataset]) -> np.ndarray:
    ps = [float(v) for v in cts[0].PixelSpacing]
    a = np.eye(4)
    a[:3, 0] = (0, 0, 2.5)
    a[:3, 1] = (0, ps[0], 0)  # rows run along +y (column direction)
    a[:3, 2] = (ps[1], 0, 0)
    a[:3, 3] = [float(v) for v in cts[0].ImagePositionPatient]
    return a


def _description(number: int, label: str, code: str, meaning: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=hd.sr.CodedConcept(code, "SCT", meaning),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )


def _seg(cts: list[pydicom.Dataset], mask: np.ndarray, descriptions) -> pydicom.Dataset:
    import highdicom as hd

    seg = hd.seg.Segmentation(
        source_images=cts,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=100,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
    )
    return pydicom.dcmread(pydicom.filebase.DicomBytesIO(_to_bytes(seg)))


def _to_bytes(ds: pydicom.Dataset) -> bytes:
    buf = pydicom.filebase.DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_seg_segments_map_to_label_ids(shared_data: Path) -> None:
    labels = load_label_table()
    cts = _ct_series(shared_data)
    rows, cols = int(cts[0].Rows), int(cts[0].Columns)
    mask = np.zeros((len(cts), rows, cols, 2), dtype=np.uint8)
    mask[1:3, 10:20, 30:40, 0] = 1  # segment 1: code unknown to the table, label "Sartorius left" -> sartorius
    mask[2, 50:60, 5:9, 1] = 1  # segment 2: femur's SNOMED code, free-text label -> femur (by code)
    femur_code = labels.by_key("femur").snomed_code
    assert femur_code, "the label table must give the femur a SNOMED code for this test"
    seg = _seg(cts, mask, [
        _description(1, "Sartorius left", "91723000", "Anatomical structure"),
        _description(2, "Thigh bone (Slicer)", femur_code, "Femur"),
    ])
    matches = match_segments(seg, labels)
    assert [(m.segment_number, m.label_id, m.matched_by) for m in matches] == [
        (1, labels.by_key("sartorius").id, "label"), (2, labels.by_key("femur").id, "code")]
    out = rasterize_seg(seg, (len(cts), rows, cols), _affine(cts), labels, str(cts[0].FrameOfReferenceUID))
    expected = np.zeros((len(cts), rows, cols), np.uint8)
    expected[1:3, 10:20, 30:40] = labels.by_key("sartorius").id
    expected[2, 50:60, 5:9] = labels.by_key("femur").id
    assert np.array_equal(out, expected)


def test_unknown_segment_is_refused(shared_data: Path) -> None:
    labels = load_label_table()
    cts = _ct_series(shared_data, 2)
    mask = np.zeros((2, int(cts[0].Rows), int(cts[0].Columns)), dtype=np.uint8)
    mask[0, 1:4, 1:4] = 1
    seg = _seg(cts, mask, [_description(1, "Liver", "10200004", "Liver")])
    with pytest.raises(SegImportError, match="segment 1 \\(SegmentLabel 'Liver'.*matches no structure"):
        rasterize_seg(seg, (2, int(cts[0].Rows), int(cts[0].Columns)), _affine(cts), labels)


def test_frame_of_reference_mismatch(shared_data: Path) -> None:
    labels = load_label_table()
    cts = _ct_series(shared_data, 2)
    mask = np.zeros((2, int(cts[0].Rows), int(cts[0].Columns)), dtype=np.uint8)
    mask[0, 1:4, 1:4] = 1
    seg = _seg(cts, mask, [_description(1, "Femur", "71341001", "Femur")])
    with pytest.raises(SegImportError, match="FrameOfReferenceUID"):
        rasterize_seg(seg, mask.shape, _affine(cts), labels, "1.2.3.4")


def test_reference_seg_file_reads(shared_data: Path) -> None:
    """The highdicom reference SEG (segment 'first segment', Bone) does not match our table."""
    ds = pydicom.dcmread(shared_data / "reference-seg-sr" / "highdicom" / "seg_image_ct_binary.dcm")
    with pytest.raises(SegImportError, match="first segment"):
        match_segments(ds, load_label_table())
