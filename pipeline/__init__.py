"""What a study passes through, pure computation: select series, load volume, preprocess, infer,
measure, compare.

Never imports pynetdicom, highdicom, ``thighnode``, ``modelkit`` or ``research``.
"""
