"""``make bench``: this project against Django Channels on this machine, with one load client.

Run ``python -m bench --help``. See ``bench/harness.py`` for the workloads.
"""
