"""Thin entry point: `python jobs/generate_data.py --help` or `spark-submit jobs/generate_data.py --help`."""
from pipelines.cli import generate_data_main

if __name__ == "__main__":
    generate_data_main()
