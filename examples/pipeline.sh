#!/usr/bin/env bash
# The acseg pipeline as one shell pipe: each stage prints the path of what it wrote, the next reads it.
#   examples/pipeline.sh [IMAGES] [GT] [OUT] [K] [DATASET]
# Without --acg, conceptualize fits an ACG on the features first (saved beside its output).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
IMAGES=${1:-$here/camvid/images}
GT=${2:-$here/camvid/labels}
OUT=${3:-out-pipe}
K=${4:-11}
DATASET=${5:-camvid11}
ACSEG=${ACSEG:-acseg}
mkdir -p "$OUT"

$ACSEG extract "$IMAGES" -o "$OUT/feats.h5" ${EXTRACT_FLAGS:---overwrite} \
  | $ACSEG conceptualize --fit-steps "${FIT_STEPS:-auto}" --overwrite \
  | $ACSEG classify --n-classes "$K" -o "$OUT/labels" --overwrite \
  | $ACSEG refine -f "$OUT/feats.h5" -o "$OUT/refined" --overwrite \
  | $ACSEG score - "$GT" --dataset "$DATASET" --no-confusion > "$OUT/score.json"

python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'mIoU {100*r[\"miou\"]:.1f}, pixel accuracy {100*r[\"pixel_accuracy\"]:.1f}')" "$OUT/score.json"
