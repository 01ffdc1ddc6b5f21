"""Tools beside the library, not part of its data path: nothing in trainer_sync imports from here.

``local_cluster``: trainer ranks and receivers as spawned local processes (gloo), used by the tests, the
benchmarks and the recipes. It lives in the package so that they import the installed package only.
"""
