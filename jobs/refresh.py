"""Daily refresh: build_sequences -> batch inference -> Feast snapshots -> materialize-incremental.

    spark-submit jobs/refresh.py --lake LAKE --bundle BUNDLE --feast-data FEAST_DATA
    python jobs/refresh.py --lake LAKE --bundle BUNDLE --feast-data FEAST_DATA

Everything lives in pipelines/refresh.py (main); docs/operations.md has the schedule and the
model rollout procedure (--new-model).
"""
from ctt_contracts.process import run_job
from pipelines.refresh import main

if __name__ == "__main__":
    run_job(main)
