"""Start the online resolver over HTTP on 127.0.0.1 (see serving/cli.py: serve_main)."""
from ctt_contracts.process import run_job
from serving.cli import serve_main as main

if __name__ == "__main__":
    run_job(main)
