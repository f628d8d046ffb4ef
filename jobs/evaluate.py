"""Evaluation report from saved bundles: contextual (pseudo/real/no context) vs sequence-only vs
the baselines (popularity, top category popularity, subject-item co-occurrence, category
popularity) on the same examples, quality checks with paired bootstrap 95 % intervals ("not
enough data" below 100 examples or with a zero denominator), plus the measured latency of the
serving path -> report folder (evaluation.md + PNG plots + evaluation.json) + MLflow run.

    python jobs/evaluate.py --lake <lake> --contextual-bundle runs/contextual/bundle \
        --sequence-only-bundle runs/sequence_only/bundle --out-dir runs/report \
        [--index index --feature-repo feature_repo]

With ``--index`` and ``--feature-repo`` (after batch inference, feast apply/materialize and
jobs/build_index.py; CTT_LAKE and CTT_FEAST_DATA exported) the report times real in-process
resolver requests; without them it says latency was not measured. See models/cli.py and
serving/latency.py.
"""
from ctt_contracts.process import run_job
from serving.latency import evaluate_main as main

if __name__ == "__main__":
    run_job(main)
