"""DICOM network ingress: AE, handlers, spool, instance index and study assembly.

Imports neither ``pipeline``, ``dicomout`` nor ``thighnode``.
"""
