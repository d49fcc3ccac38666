"""Thin entry point: see moa_train/results/decoding.py (`python3
scripts/time_translation_decoding.py --help`)."""

from moa_train.results.decoding import main

if __name__ == "__main__":
    main()
