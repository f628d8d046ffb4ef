"""Shadow evaluation: re-score a request log with another bundle + index (see serving/replay.py)."""
from ctt_contracts.process import run_job
from serving.replay import main

if __name__ == "__main__":
    run_job(main)
