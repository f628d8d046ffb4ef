"""Thin entry point: `python jobs/build_sequences.py --help` or `spark-submit jobs/build_sequences.py --help`."""
from ctt_contracts.process import run_job
from pipelines.cli import build_sequences_main

if __name__ == "__main__":
    run_job(build_sequences_main)
