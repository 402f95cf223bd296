"""DICOM network: the association factory, ingress AE and handlers, spool, instance index,
Query/Retrieve SCU, and the checks and statuses they share.

Imports neither ``pipeline``, ``dicomout`` nor ``thighnode``.
"""
