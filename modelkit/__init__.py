"""Offline model work: phantoms, training data and its case cache, training, volume calibration,
evaluation, and the import of NIfTI / DICOM-SEG ground truth.

May import ``pipeline``; nothing on the node's run-time path imports it (only the CLI does).
"""
