#!/bin/bash
# issue 28's grid: training augmentation low/mid/high x sampling level x 3 seeds (one process per seed)
cd /work/main
date +%s > /work/grid/start
for s in 0 1 2; do
  OMP_NUM_THREADS=1 .venv/bin/cascade study-sr --config toy --subject /work/grid/subject --class-noun toy --train \
    --variant aug0=0:0 --variant aug250=250:250 --variant aug500=500:500 --max-steps 1000 \
    --noise-levels 0,20,500 --seeds $s --stage1 none --num-stage1 0 --class-images 0 --max-images 5 --dino none \
    --output /work/grid/seed$s --set stage2.sample.steps=15 --set models.cache_dir=/tmp/embcache \
    --set stage2.train.sample_every=100000 --set stage2.train.checkpoint_every=500 > /work/grid/seed$s.log 2>&1 &
done
wait
date +%s > /work/grid/end
