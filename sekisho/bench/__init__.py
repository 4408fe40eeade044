"""`sekisho bench …`: benchmark commands that print their figures and a one-line JSON summary."""

from sekisho.bench.cli import bench_app

__all__ = ["bench_app"]
