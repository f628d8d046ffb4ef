"""Shadow evaluation: re-score a request log with another bundle + index (see serving/replay.py)."""
from serving.replay import main

if __name__ == "__main__":
    raise SystemExit(main())
