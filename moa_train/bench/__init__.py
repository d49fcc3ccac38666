"""moa-bench: the training benchmark (train.py), or with --decode the inference benchmark
(decode.py); common.py holds what both use."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from moa_train.registration import ensure_registered

    ensure_registered()  # the package's variants: the models the benchmarks list and build
    argv = sys.argv[1:] if argv is None else list(argv)
    # imported here: loading one benchmark (or common, which both import) leaves the other unloaded
    if "--decode" in argv:
        from moa_train.bench.decode import main as decode_main

        return decode_main([a for a in argv if a != "--decode"])
    from moa_train.bench.train import main as train_main

    return train_main(argv)
