"""The step check's table for several losses: one row per ``map_step_check.py`` JSON file.

Each file holds one step along the mean of the minibatch directions (each scaled to unit
length first, ``map/unit``) of one loss (``--direction-from-config``; the file without it is
the exact pseudo-gradient, and gives the softmax row too). Per row: the change of the mAP of
the seen images (one AP context) and of the held-out pool at each step length, in points.

    python experiments/map_step_check_table.py experiments/map_mechanisms/step_check/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(paths: list[Path]) -> list[str]:
    out, steps = [], None
    for path in sorted(paths):
        d = json.loads(path.read_text())
        av = d["averaged_direction"]
        keys = sorted((k for k in av if k.startswith("map/unit@")),
                      key=lambda k: float(k.split("@")[1]))
        steps = steps or [k.split("@")[1] for k in keys]
        shown = [o for o in d.get("overrides", []) if not o.startswith(("train.threads",
                                                                         "loss.num_threads"))]
        label = " ".join(shown) if d.get("direction_from_config") else (
            "exact pseudo-gradient (train.loss=map, normalization none)")
        cells = " | ".join(f"{100 * av[k]['seen']:+.2f} / {100 * av[k]['pool']:+.2f}"
                           for k in keys)
        out.append(f"| {path.stem} | `{label}` | {cells} |")
        if not d.get("direction_from_config"):
            soft = sorted((k for k in av if k.startswith("softmax/unit@")),
                          key=lambda k: float(k.split("@")[1]))
            cells = " | ".join(f"{100 * av[k]['seen']:+.2f} / {100 * av[k]['pool']:+.2f}"
                               for k in soft)
            out.insert(0, f"| softmax | `train.loss=softmax` (Fast R-CNN's loss) | {cells} |")
            base = av["base_mAP"]
    head = [f"Base mAP: seen {100 * base['seen']:.2f}, pool {100 * base['pool']:.2f}. "
            "Change after one step along the mean unit direction (seen / pool, points):", "",
            "| file | loss | " + " | ".join(f"step {s}" for s in steps) + " |",
            "|---|---|" + "---|" * len(steps)]
    return head + out


if __name__ == "__main__":
    print("\n".join(rows([Path(p) for p in sys.argv[1:]])))
