"""Thin entry point: see moa_train/results/translation.py (`python3 scripts/reproduce_translation.py
--help`)."""

from moa_train.results.translation import main

if __name__ == "__main__":
    main()
