"""Batch inference job: encoder last hidden state per user -> user_states (Delta MERGE) -> Feast snapshots.

    spark-submit --master local-cluster[2,1,2048] jobs/batch_inference.py --lake LAKE --bundle BUNDLE
    python jobs/batch_inference.py --lake LAKE --bundle BUNDLE

Everything lives in pipelines/inference.py (main).
"""
from ctt_contracts.process import run_job
from pipelines.inference import main

if __name__ == "__main__":
    run_job(main)
