#!/bin/bash
cd /work/main
for pair in committed:cascade/toy/weights/stage2/unet sr1950:benchmarks/toy-sr-specks-1950/unet w0-400:/work/exp/w0/model/stage2/unet w20-400:/work/exp/w20/model/stage2/unet r45w20-400:/work/exp/r45w20/model/stage2/unet r45w100-1400:RUN-r45w100-step1400/unet low50-400:RUN-low50-step400/unet; do
  n=${pair%%:*}; u=${pair#*:}; d=/work/diag/prem/$n
  rm -rf $d; mkdir -p $d/stage2; ln -s /work/main/cascade/toy/weights/stage1 $d/stage1
  for p in image_noising_scheduler model_index.json scheduler; do cp -r cascade/toy/weights/stage2/$p $d/stage2/; done
  cp -r $u $d/stage2/unet
  echo "== $n ($u)"
  OMP_NUM_THREADS=1 .venv/bin/python -m cascade toy premise --views 12 --seeds 1 --levels 0,250 --sr $d/stage2 2>&1 | grep -v "Warn\|Load\|transformers"
done
