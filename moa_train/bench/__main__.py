"""`python -m moa_train.bench`: moa-bench."""

import sys

from moa_train.bench import main

if __name__ == "__main__":
    sys.exit(main())
