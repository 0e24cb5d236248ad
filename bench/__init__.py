"""Benchmarks for imgq (not part of the installed package). Run from the repo root:

    .venv/bin/python -m bench.pipeline --arch tiny
    .venv/bin/python -m bench.pipeline --arch base --images 32 --naive

See docs/performance.md for what each figure means and the latest numbers.
"""
