"""Cohort analyses of the reference papers over the studies the node has measured.

May import ``pipeline``'s types and the results store's rows; the node never imports it (only the CLI does).
"""
