#!/usr/bin/env bash
# Every head tuned under one budget on MVSA-Single (default encoders): the same search for each head,
# 30 trials COMPLETE or PRUNED, one seed a trial (1001), the median pruner on each epoch's dev, the 5 best
# re-scored on seeds 1002-1004, the choice trained with seeds 1-5 into <head>/best/ (docs/search.md).
# The schedule and protocol are those of results/mvsa_s-heads.sh (--patience 10, --protocol-check), so each
# best/ row compares with its untuned row there. Test is never read by a search.
# Two lanes of one-thread processes; resumable: the same script continues each study from its journal.
# Then: python pipeline.py results results/mvsa_s-tuned/*/best --against probe
set -euo pipefail
cd "$(dirname "$0")/.."

search() {  # head
  python pipeline.py search --dataset mvsa_s --head "$1" --trials 30 --rescore 5 --patience 10 --protocol-check \
    --jobs 1 --threads 1 --out "results/mvsa_s-tuned/$1"
}

lane_a() { search probe; search spp_scl; }
lane_b() { search late_concat; search hybrid_fusion; search clip_ca_cg; }
lane_a > results/mvsa_s-tuned.lane-a.log 2>&1 &
lane_b > results/mvsa_s-tuned.lane-b.log 2>&1 &
wait
