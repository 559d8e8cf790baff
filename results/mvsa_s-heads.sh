#!/usr/bin/env bash
# The evidence behind the README's MVSA-Single heads table: every head, seeds 1-5, the default
# schedule (150 epochs) with --patience 10, and test also scored in file order after every epoch
# (--protocol-check: what the authors' protocol would report; never used for selection).
# Two lanes of one-thread processes keep both cores busy to the end (--jobs does not change a number).
# Resumable: a finished seed (seed-<s>.json) is never trained again, an unfinished one continues.
# Then: python pipeline.py results results/mvsa_s-heads --against probe
set -euo pipefail
cd "$(dirname "$0")/.."

train() {  # name, then the head and its flags
  local name=$1; shift
  python pipeline.py train --dataset mvsa_s --head "$@" --patience 10 --protocol-check --jobs 1 --threads 1 \
    --out "results/mvsa_s-heads/$name"
}

lane_a() { train spp_scl spp_scl; train late_concat late_concat; train clip_ca_cg clip_ca_cg; train image_only image_only; }
lane_b() { train probe probe; train spp_scl-official spp_scl --official; train text_only text_only; train hybrid_fusion hybrid_fusion; }
lane_a > results/mvsa_s-heads.lane-a.log 2>&1 &
lane_b > results/mvsa_s-heads.lane-b.log 2>&1 &
wait
