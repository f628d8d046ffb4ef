"""Build the ScaNN index of a model bundle's catalog (see serving/cli.py: build_index_main)."""
from serving.cli import build_index_main as main

if __name__ == "__main__":
    raise SystemExit(main())
