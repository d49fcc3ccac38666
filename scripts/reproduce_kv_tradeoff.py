"""Thin entry point: see moa_train/results/kv_tradeoff.py (`python3 scripts/reproduce_kv_tradeoff.py
--help`)."""

from moa_train.results.kv_tradeoff import main

if __name__ == "__main__":
    main()
