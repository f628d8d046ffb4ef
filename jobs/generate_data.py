"""Thin entry point: `python jobs/generate_data.py --help` or `spark-submit jobs/generate_data.py --help`."""
from ctt_contracts.process import run_job
from pipelines.cli import generate_data_main

if __name__ == "__main__":
    run_job(generate_data_main)
