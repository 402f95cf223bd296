"""DICOM outputs: SEG / SR / PDF builders, the persistent outbox and the C-STORE sender.

May import ``pipeline``'s result types and ``scp``'s association factory, statuses, validators and
SQLite opener; never ``thighnode``.
"""
