"""DICOM outputs: SEG / SR / PDF builders, the persistent outbox and the C-STORE sender.

May import ``pipeline``'s result types; never ``scp`` or ``thighnode``.
"""
