"""Build the ScaNN index of a model bundle's catalog (see serving/cli.py: build_index_main)."""
from ctt_contracts.process import run_job
from serving.cli import build_index_main as main

if __name__ == "__main__":
    run_job(main)
