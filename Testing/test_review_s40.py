"""Session 40: what a README audit and other reviews found outside the Slicer module."""

from __future__ import annotations

import re

from PAMSegmentLib import benchmark as bm


def test_a_target_ratio_is_rounded_once_for_the_table():
    """A README audit (session 40): the published run's batch-4 ratio, 117.54 / 10.446 ms = 11.252,
    was stored rounded to 11.25 and then printed 11.2 (round half to even of the rounded value),
    while the README's text said 11.3 from the same run. The targets keep the figure as measured;
    the table rounds it once."""
    net = [dict(model="pam-small", batch=4, slices_per_s=1000 / 10.446115247759735, status="ok"),
           dict(model="pam-official", batch=4, slices_per_s=1000 / 117.5400844986143, status="ok")]
    paired = [dict(batch=1, pairs=40, ratio=10.2496, ratio_q25=9.9, ratio_q75=10.5, status="ok")]
    targets = bm.evaluate_targets({"network": net, "paired": paired, "end_to_end": []})
    row = next(t for t in targets if t["target"] == "default/official throughput, batch 4")
    assert abs(row["value"] - 11.2520) < 1e-4
    table = bm._table(targets, ["target", "value"])
    assert re.search(r"throughput, batch 4 +11\.3 ", table)  # (11.25 printed 11.2)
    assert re.search(r"alternated\) +10\.2 ", table)  # 10.2496 rounded once (not 10.25, then 10.2 by luck)
