#!/usr/bin/env python
"""Record per-slice stop signals of a propagation on TRAINING-case structures, to design and
choose the walk's stopping rule offline (never on evaluation data).

    python scripts/stop_signals.py CKPT --cases ts_ct,ts_ct_dicom,tptbox_ct_vert --out runs/stop_set1.npz

The structures and prompts are those of ``scripts/validate.py`` (same selection, same seed). The
walk runs with the checkpoint's own stopping rule; for every predicted slice the script records
the network's object-present probability, the areas of the network's mask, of the registration's
warped mask and of the fused mask, the guide's area, the intensity-drift score of the fused
region against the drawn slice and against the window's guide, and the slice's reference area and overlap. A stricter rule only
ends a side earlier, and everything before that slice is unchanged, so any such rule can be
scored exactly from this record (``--rules``) without running the network again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PAMSegmentLib.baselines import IntensityGate  # noqa: E402
from PAMSegmentLib.errors import InputError  # noqa: E402
from PAMSegmentLib.evaluation import prompt_from_reference, validation_items, validation_prompt_slices  # noqa: E402
from PAMSegmentLib.pam_predictor import PAMPredictor, _smoothed  # noqa: E402
from PAMSegmentLib.propagate import SlicePrediction, propagate  # noqa: E402

FIELDS = ("item", "slice", "side", "presence", "a_net", "a_warp", "a_fused", "a_guide", "a_prompt", "gate",
          "dice_net_warp", "a_ref", "inter", "a_pred", "gate_guide")


class RecordingPredictor(PAMPredictor):
    """The shipped predictor, recording what each fused slice was made of."""

    def begin(self, volume, prompt_index, prompt_mask):
        super().begin(volume, prompt_index, prompt_mask)
        self.rows = {}
        self.prompt_index = int(prompt_index)
        self.prompt_area = int(np.count_nonzero(prompt_mask))
        self.drift = IntensityGate.from_prompt(_smoothed(volume[prompt_index]), prompt_mask)
        self._volume = volume

    def predict(self, volume, guide_index, guide_mask, query_indices):
        self._guide_area = int(np.count_nonzero(guide_mask))
        self._guide_gate = (IntensityGate.from_prompt(_smoothed(volume[guide_index]), guide_mask)
                            if np.any(guide_mask) else self.drift)
        out = super().predict(volume, guide_index, guide_mask, query_indices)
        if not getattr(self, "_fused_here", False):  # network only (no registration plan)
            self._record(query_indices, out.prob, None, out, None)
        self._fused_here = False
        return out

    def _fuse(self, out, plan, transforms, guide_index, queries):
        net = np.array(out.prob, dtype=np.float32, copy=True)
        res = super()._fuse(out, plan, transforms, guide_index, queries)
        w = self.registration_weight
        warp = (res.prob - (1 - w) * net) / max(w, 1e-6)
        self._record(queries, net, warp, res, res.agreement)
        self._fused_here = True
        return res

    def _record(self, queries, net, warp, res: SlicePrediction, agreement):
        t = self.threshold
        for n, q in enumerate(queries):
            fused = res.prob[n] >= t
            nm = net[n] >= t
            wm = warp[n] >= 0.5 if warp is not None else nm
            vals = _smoothed(self._volume[q])[fused]
            self.rows[int(q)] = {
                "presence": float(res.presence[n]) if res.presence is not None else np.nan,
                "a_net": int(nm.sum()), "a_warp": int(wm.sum()), "a_fused": int(fused.sum()),
                "a_guide": self._guide_area, "a_prompt": self.prompt_area,
                "gate": self.drift.score(vals) if vals.size else 0.0,
                "gate_guide": self._guide_gate.score(vals) if vals.size else 0.0,
                # the predictor's own agreement (what the engine's keyframe test reads); 1 without fusion
                "dice_net_warp": 1.0 if agreement is None else float(agreement[n]),
            }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--cache", default=os.environ.get("PAMSEGMENT_CACHE", str(ROOT / "cache")))
    ap.add_argument("--cases", default="ts_ct,ts_ct_dicom,tptbox_ct_vert")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--keyframes", action="store_true",
                    help="prompt = the reference at 25 %% and 75 %% of the extent; the outward walks are recorded")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from PAMSegmentLib.checkpoints import load_checkpoint_file

    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    try:  # the same structures as scripts/validate.py
        cases, items = validation_items(args.cache, ROOT / "scripts" / "split.json", names, args.n)
    except InputError as exc:
        raise SystemExit(f"error: {exc}") from None
    model = load_checkpoint_file(args.checkpoint)
    rows, names_out = [], []
    for k, (cid, lab) in enumerate(items):
        case = cases[cid]
        ref = case.labels == lab
        drawn = validation_prompt_slices(ref, args.keyframes)  # as validate.py draws them
        lo, hi = drawn[0], drawn[-1]
        prompt = prompt_from_reference(ref, drawn)
        predictor = RecordingPredictor(model)
        res = propagate(case.image, prompt, case.spacing, predictor, axis=0)
        mask = res.mask > 0
        a_ref = ref.sum(axis=(1, 2))
        inter = (mask & ref).sum(axis=(1, 2))
        a_pred = mask.sum(axis=(1, 2))
        for s in range(ref.shape[0]):
            r = predictor.rows.get(s) if s not in drawn else None
            # Only the walks outward from the outermost drawn slices can be ended by a stop rule.
            side = 1 if s > hi else (-1 if s < lo else 0)
            if r is None and s not in drawn:
                continue
            r = r or {"presence": 1.0, "a_net": int(a_ref[s]), "a_warp": int(a_ref[s]), "a_fused": int(a_ref[s]),
                      "a_guide": int(a_ref[s]), "a_prompt": int(a_ref[s]), "gate": 1.0, "dice_net_warp": 1.0,
                           "gate_guide": 1.0}
            rows.append([k, s, side, r["presence"], r["a_net"], r["a_warp"], r["a_fused"], r["a_guide"],
                         r["a_prompt"], r["gate"], r["dice_net_warp"], int(a_ref[s]), int(inter[s]), int(a_pred[s]),
                         r["gate_guide"]])
        # Reference voxels on slices the walk never reached count against every rule alike.
        missed = int(a_ref.sum() - sum(a_ref[s] for s in set(predictor.rows) | set(drawn)))
        pred_total = int(a_pred.sum())
        names_out.append((cid, case.label_names.get(lab, str(lab)), int(lo), missed, pred_total, int(hi)))
        d = 2 * inter.sum() / max(a_pred.sum() + a_ref.sum(), 1)
        print(f"{cid:18s} {names_out[-1][1][:28]:28s} dice {d:.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, rows=np.array(rows, dtype=np.float64), fields=np.array(FIELDS),
             items=np.array([json.dumps(x) for x in names_out]))
    print(f"{len(items)} structures recorded to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
