#!/usr/bin/env python
"""Time on Slicer's main thread of the panel's calls for one Propagate, one Update and one Undo.

    python scripts/benchmark_slicer_panel.py [--depth 300] [--size 512] [--repeats 3] [--finished N]

Needs the slicer-core wheel (`pip install slicer-core`): real MRML nodes, no Qt. A synthetic int16
CT of size x size x depth (an ellipsoid on noise, 0.8 x 0.8 x 1 mm), the segmentation on the
volume's grid (the Segment Editor's usual geometry), one slice of the ellipsoid drawn; the `copy`
baseline stands in for the network (the worker's time is not the main thread's, and is printed
apart). The calls are those the panel makes on the main thread: the prompt line
(``describe_prompt``), the job's copy-out (``SegmentPropagation``), the write (``apply``), the edits
check the prompt line makes after it; then a slice erased in part, the edits check, the update's
copy-out and write, and Undo propagation. Prints the median of ``--repeats`` runs of each, in a
fresh scene each time. ``--finished N`` also times Propagate all drawn on a segmentation of N finished
organs (ellipsoids filled on every slice, passed over) and two drawings, once (its masks are built as
volume-sized booleans: about 1.7 GB for 20 organs at 512 x 512 x 300).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def one_run(depth: int, size: int) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "Testing"))
    import slicer  # noqa: PLC0415
    from conftest_mrml import ellipsoid, make_segmentation, make_volume_node, scene_context  # noqa: PLC0415

    from PAMSegmentLib import mrml  # noqa: PLC0415
    from PAMSegmentLib.baselines import CopyPredictor  # noqa: PLC0415

    rng = np.random.default_rng(0)
    shape = (depth, size, size)
    image = rng.normal(0, 20, shape).astype(np.int16)
    truth = ellipsoid(shape, (depth // 2, size // 2, size // 2), (depth // 4, size // 8, size // 6))
    image[truth] += 200
    drawn = np.zeros(shape, bool)
    drawn[depth // 2] = truth[depth // 2]
    times: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        times[name] = time.perf_counter() - t0
        return out

    with scene_context():
        volume = make_volume_node(image, spacing_ijk=(0.8, 0.8, 1.0))
        segmentation, ids = make_segmentation(volume, {"object": drawn})
        sid = ids["object"]
        history = mrml.PropagationHistory()

        def edits_check():
            entry = history.get(segmentation, sid)
            return entry.edited_slices(mrml.segment_mask(segmentation, sid, volume, check_memory="reading the segment"))

        timed("propagate: prompt line (describe_prompt)", mrml.describe_prompt, volume, segmentation, sid)
        job = timed("propagate: copy-out (SegmentPropagation)", mrml.SegmentPropagation, volume, segmentation, sid,
                    model=CopyPredictor())
        timed("propagate: worker (copy baseline; not the main thread)", job.run)
        timed("propagate: write (apply)", job.apply, history=history)
        timed("propagate: edits check after the write", edits_check)
        job.release()
        current = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, sid, volume).astype(np.uint8)
        current[depth // 2 + max(1, depth // 30), :, size // 2:] = 0  # the user erases half of a slice
        slicer.util.updateSegmentBinaryLabelmapFromArray(current, segmentation, sid, volume)
        del current
        timed("update: edits check (the prompt line)", edits_check)
        update = timed("update: copy-out (SegmentUpdate)", mrml.SegmentUpdate, volume, segmentation, sid, history,
                       model=CopyPredictor())
        timed("update: worker (copy baseline; not the main thread)", update.run)
        timed("update: write (apply)", update.apply, history=history)
        update.release()
        timed("undo propagation (undo_last)", history.undo_last, segmentation, sid)
    return times


def queue_run(depth: int, size: int, finished: int) -> tuple[float, float, str]:
    """Propagate all drawn on ``finished`` finished organs (ellipsoids filled on every slice) and two
    drawings, as the panel runs it: (main-thread seconds, worker seconds, the queue's summary)."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "Testing"))
    from conftest_mrml import ellipsoid, make_segmentation, make_volume_node, scene_context  # noqa: PLC0415

    from PAMSegmentLib import mrml  # noqa: PLC0415
    from PAMSegmentLib.baselines import CopyPredictor  # noqa: PLC0415

    rng = np.random.default_rng(1)
    shape = (depth, size, size)
    image = rng.normal(0, 20, shape).astype(np.int16)
    masks = {}
    for n in range(finished):
        centre = [rng.uniform(0.2, 0.8) * s for s in shape]
        masks[f"organ {n}"] = ellipsoid(shape, centre, [rng.uniform(0.03, 0.12) * s for s in shape])
    for n in range(2):
        organ = ellipsoid(shape, (depth // 2, size // 2 + (n - 0.5) * size // 4, size // 2), (depth // 8, size // 10,
                                                                                            size // 9))
        image[organ] += 150
        masks[f"drawn {n}"] = np.zeros(shape, bool)
        masks[f"drawn {n}"][depth // 2] = organ[depth // 2]
    with scene_context():
        volume = make_volume_node(image, spacing_ijk=(0.8, 0.8, 1.0))
        segmentation, _ = make_segmentation(volume, masks)
        queue, history = mrml.SegmentQueue(volume, segmentation), mrml.PropagationHistory()
        main_thread = worker = 0.0
        while True:
            t0 = time.perf_counter()
            job = queue.start_next(lambda sid: mrml.SegmentPropagation(volume, segmentation, sid,
                                                                       model=CopyPredictor()), history)
            main_thread += time.perf_counter() - t0
            if job is None:
                break
            t0 = time.perf_counter()
            job.run()
            worker += time.perf_counter() - t0
            t0 = time.perf_counter()
            job.apply(history=history)
            queue.record("written", "")
            job.release()
            main_thread += time.perf_counter() - t0
        return main_thread, worker, queue.summary()[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--finished", type=int, default=0,
                        help="also time Propagate all drawn on this many finished segments and two drawings")
    args = parser.parse_args(argv)
    import vtk  # noqa: PLC0415

    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)  # the headless scene has no colour files
    runs = [one_run(args.depth, args.size) for _ in range(args.repeats)]
    print(f"{args.size} x {args.size} x {args.depth} int16, median of {args.repeats} runs (seconds):")
    main_thread = {"propagate": 0.0, "update": 0.0}
    for name in runs[0]:
        value = statistics.median(run[name] for run in runs)
        print(f"  {name:58s} {value:6.3f}")
        for kind in main_thread:
            if name.startswith(kind) and "worker" not in name:
                main_thread[kind] += value
    for kind, value in main_thread.items():
        print(f"  {kind}: main thread in all {value:.2f} s")
    if args.finished:
        main_s, worker_s, summary = queue_run(args.depth, args.size, args.finished)
        print(f"propagate all drawn, {args.finished} finished segments and 2 drawings: main thread {main_s:.2f} s, "
              f"worker {worker_s:.2f} s (copy baseline)\n  {summary[:160]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
