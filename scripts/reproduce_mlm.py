"""Thin entry point: see moa_train/results/mlm.py (`python3 scripts/reproduce_mlm.py --help`)."""

from moa_train.results.mlm import main

if __name__ == "__main__":
    main()
