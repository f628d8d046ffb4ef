"""Evaluation table from saved bundles: contextual (pseudo/real/no context) vs sequence-only vs
popularity baselines on the same examples -> report folder + MLflow run.

    python jobs/evaluate.py --lake_root <lake> --contextual_bundle runs/contextual/bundle \
        --sequence_only_bundle runs/sequence_only/bundle --out_dir runs/report
"""
from models.cli import evaluate_main as main

if __name__ == "__main__":
    main()
