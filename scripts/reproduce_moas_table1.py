"""Thin entry point: see moa_train/results/moas_table1.py (`python3 scripts/reproduce_moas_table1.py
--help`)."""

from moa_train.results.moas_table1 import main

if __name__ == "__main__":
    main()
