"""Thin entry point: see moa_train/results/successors.py (`python3 scripts/reproduce_successors.py
--help`)."""

from moa_train.results.successors import main

if __name__ == "__main__":
    main()
