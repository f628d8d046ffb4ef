"""Thin entry point: `python jobs/ingest.py --help` or `spark-submit jobs/ingest.py --help`."""
from ctt_contracts.process import run_job
from pipelines.cli import ingest_main

if __name__ == "__main__":
    run_job(ingest_main)
