#!/usr/bin/env bash
# Sharded extraction on one machine with GNU parallel (xargs -P when parallel is not installed), then merge.
#
#   examples/parallel_extract.sh IMAGES OUT N [extract options...]
#   examples/parallel_extract.sh ~/photos ~/run 4 --batch-size 16    # -> ~/run/feats.h5
#
# A shard killed half-way resumes on the next run (--resume); the merge checks that every image is there once.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 IMAGES OUT N [extract options...]" >&2
  exit 2
fi
images=$1 out=$2 n=$3
shift 3
ACSEG=${ACSEG:-acseg}
mkdir -p "$out/shards"
shard() {  # $1 = shard index; a finished shard is kept (delete OUT/shards to redo it)
  [ -f "$out/shards/feats.$1.h5" ] && return 0
  $ACSEG extract "$images" --shard "$1/$n" -o "$out/shards/feats.$1.h5" --resume -q "${@:2}" >/dev/null
}
export -f shard
export ACSEG images out n
if command -v parallel >/dev/null; then
  seq 0 $((n - 1)) | parallel --halt now,fail=1 shard {} "$@"
else
  seq 0 $((n - 1)) | xargs -P "$n" -I{} bash -c 'shard "$@"' _ {} "$@"
fi
$ACSEG merge $(seq -f "$out/shards/feats.%g.h5" 0 $((n - 1))) -o "$out/feats.h5" --overwrite
