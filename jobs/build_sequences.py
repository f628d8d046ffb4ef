"""Thin entry point: `python jobs/build_sequences.py --help` or `spark-submit jobs/build_sequences.py --help`."""
from pipelines.cli import build_sequences_main

if __name__ == "__main__":
    build_sequences_main()
