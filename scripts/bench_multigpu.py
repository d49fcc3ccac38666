"""Thin entry point: see moa_train/results/multigpu.py (`python3 scripts/bench_multigpu.py
--help`)."""

from moa_train.results.multigpu import main

if __name__ == "__main__":
    main()
