"""Draw a floors.py result file as a PNG: latency per operation, floor / project / Django.

    pip install -e '.[bench]'
    python bench/chart.py bench-floor.json docs/latency.png

One group of bars per operation (median latency in microseconds, from the
result file's `results`), with the paired ratio project/floor written over
the project's bar. The title names the run (its id, date and the machine's
load), so a chart always says which run it shows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GROUPS = [
    ("hit", "get_session, hit"),
    ("write", "update_session"),
    ("miss", "get_session, miss"),
    ("append10", "add_message"),
]
FAMILIES = [("floor", "#9e9e9e"), ("project", "#1f77b4"), ("django", "#ff7f0e")]


def medians(doc: dict) -> dict[tuple[str, str], float]:
    """(group, family) -> median microseconds; the append floor is the bump floor."""
    found: dict[tuple[str, str], float] = {}
    for name, result in doc["results"].items():
        group, family = result.get("group"), result.get("family")
        if group is None or not result.get("n"):
            continue
        if group == "append10" and family == "floor" and name != "append_floor_bump":
            continue
        if group == "write" and name == "write_floor_txn":
            continue
        found.setdefault((group, family), result["median_us"])
    return found


def main(source: str, target: str) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(Path(source).read_text())
    values = medians(doc)
    figure, axes = plt.subplots(figsize=(9, 4.5))
    width = 0.26
    for offset, (family, colour) in enumerate(FAMILIES):
        xs, heights = [], []
        for index, (group, _) in enumerate(GROUPS):
            if (group, family) in values:
                xs.append(index + (offset - 1) * width)
                heights.append(values[(group, family)])
        bars = axes.bar(xs, heights, width, label=family, color=colour)
        axes.bar_label(bars, fmt="%.0f", fontsize=8)
    for index, (group, _) in enumerate(GROUPS):
        ratios = doc["ratios"].get(group, {})
        key = "project/append_floor_bump" if group == "append10" else "paired project/floor"
        ratio = ratios.get(key)
        if isinstance(ratio, dict):
            ratio = ratio.get("median")
        if ratio is not None and (group, "project") in values:
            axes.annotate(
                f"{ratio:.2f}x floor",
                (index, values[(group, "project")]),
                xytext=(0, 14),
                textcoords="offset points",
                ha="center",
                fontsize=8,
                color="#1f77b4",
            )
    axes.set_xticks(range(len(GROUPS)), [label for _, label in GROUPS])
    axes.set_ylabel("median latency per operation (µs)")
    meta = doc["meta"]
    axes.set_title(
        f"bench-floor run {meta['run_id']} ({meta['started']}), one client thread; "
        f"load {meta['loadavg_start'][0]:.1f}",
        fontsize=9,
    )
    axes.legend()
    figure.tight_layout()
    figure.savefig(target, dpi=110)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
