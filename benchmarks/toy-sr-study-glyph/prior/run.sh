#!/bin/bash
# issue 28 follow-up: does stage II prior preservation stop the SR drift? aug0 with prior pairs, trained per
# seed as run.sh trained aug0 (1000 steps, same seed and split), sampled beside run.sh's own aug0 export
cd /work/main
date +%s > GRID4/start
for s in 0 1 2; do
  T=GRID/seed$s/train/seed$s
  OMP_NUM_THREADS=1 nice -n 10 .venv/bin/cascade study-sr --config toy --subject GRID/subject --class-noun toy \
    --sr aug0=$T/aug0/export --train --variant aug0prior=0:0:prior --max-steps 1000 \
    --noise-levels 0,20,500 --seeds $s --stage1 none --num-stage1 0 --class-images 0 --max-images 5 --dino none \
    --output GRID4/seed$s --set stage2.sample.steps=15 --set models.cache_dir=/tmp/embcache \
    --set stage2.train.sample_every=100000 --set stage2.train.checkpoint_every=500 > GRID4/seed$s.log 2>&1 &
done
wait
date +%s > GRID4/end
