"""Print one line per run folder under the given paths: the run, its model, val loss and median step
time."""

import json
import sys
from pathlib import Path

for root in sys.argv[1:]:
    for s in sorted(Path(root).rglob("summary.json")):
        d = json.loads(s.read_text())
        print(
            f"{s.parent.relative_to(root)!s:40s} val {d.get('val/loss', float('nan')):.4f}  "
            f"step_ms {d.get('step_ms_median') or float('nan'):8.2f}  {d['device_name']}"
        )
