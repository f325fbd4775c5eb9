"""The Django Channels side of the benchmark: the same project, served by daphne with a channel layer.

Channels is not a dependency of the project: only ``make bench`` installs it
(requirements-bench.txt). Nothing outside this package imports it.
"""
