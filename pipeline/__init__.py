"""Pure computation: select series, load volume, preprocess, infer, measure, compare.

Never imports pynetdicom, highdicom or ``thighnode``.
"""
