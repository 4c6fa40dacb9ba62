#!/usr/bin/env bash
# Score another method's label maps (STEGO, CAUSE, yours) with acseg's protocol.
#   examples/score_external.sh PRED_DIR GT_DIR DATASET [extra score options]
# PRED_DIR: one single-channel PNG per image (cluster ids or class ids), named like the ground truth
# (strip suffixes with --pred-suffix/--gt-suffix). Cluster ids are matched to classes (Hungarian, one to one,
# over the whole set); pass --protocol majority for over-clustered outputs.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 PRED_DIR GT_DIR DATASET [acseg score options]" >&2
  exit 2
fi
pred=$1 gt=$2 dataset=$3
shift 3
# e.g. add: --confusion-png confusion.png --protocol majority --pred-suffix _pred
${ACSEG:-acseg} score "$pred" "$gt" --dataset "$dataset" --no-confusion "$@"
