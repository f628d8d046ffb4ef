"""Train a two-tower model (LightningCLI + YAML config), export its bundle, track it in MLflow.

    python jobs/train.py --config configs/contextual.yaml --data.lake_root <lake> --out-dir runs/contextual
"""
from ctt_contracts.process import run_job
from models.cli import train_main as main

if __name__ == "__main__":
    run_job(main)
