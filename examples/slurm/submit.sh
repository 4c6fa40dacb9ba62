#!/bin/bash
# The whole pipeline on a Slurm cluster: N extraction tasks, one multi-GPU fit, N conceptualize tasks, then
# one classify over all concept shards (CPU; the concept features are small).
#
#   IMAGES=/data/coco/train2017 OUT=/scratch/acseg SHARDS=16 K=27 examples/slurm/submit.sh
set -euo pipefail
: "${IMAGES:?}" "${OUT:?}"
SHARDS=${SHARDS:-16}
K=${K:-27}
here=$(cd "$(dirname "$0")" && pwd)
export IMAGES OUT SHARDS
ext=$(sbatch --parsable --array=0-$((SHARDS - 1)) --export=ALL "$here/extract.sbatch")
fit=$(sbatch --parsable --dependency=afterok:$ext --export=ALL "$here/fit.sbatch")
con=$(sbatch --parsable --dependency=afterok:$fit --array=0-$((SHARDS - 1)) --export=ALL "$here/conceptualize.sbatch")
sbatch --dependency=afterok:$con --cpus-per-task=8 --mem=64G --time=01:00:00 --job-name=acseg-classify \
  --wrap="${ACSEG:-acseg} classify $OUT/concepts/concepts.*.h5 -K $K -o $OUT/labels"
echo "submitted: extract $ext, fit $fit, conceptualize $con"
