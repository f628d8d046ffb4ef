"""Thin entry point: `python jobs/ingest.py --help` or `spark-submit jobs/ingest.py --help`."""
from pipelines.cli import ingest_main

if __name__ == "__main__":
    ingest_main()
