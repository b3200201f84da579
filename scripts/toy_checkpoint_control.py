"""Control for the best-checkpoint choice on the toy preset: the toy readers' fidelity and drift of
a stage I run's chosen export and of a checkpoint (e.g. its last step), on fresh seeds that no
validation saw (validation uses seeds seed..seed+2n-1):

    python scripts/toy_checkpoint_control.py RUN_DIR --checkpoint 100 --seeds 1000:1032 --steps 25
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def main(argv=None) -> int:
    from cascade import models
    from cascade.config import load_config
    from cascade.text import TextEncoder
    from cascade.toy import measure
    from stages import components, sampling

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--checkpoint", type=int, required=True)
    p.add_argument("--seeds", default="1000:1032")
    p.add_argument("--steps", type=int, default=25)
    a = p.parse_args(argv)
    run = Path(a.run)
    cfg = load_config(run / "config.yaml")
    meta = json.loads((run / "export" / "cascade.json").read_text())
    lo, hi = map(int, a.seeds.split(":"))
    seeds = list(range(lo, hi))
    prompts = [meta["instance_prompt"], f"a {meta['class_noun']}"]
    emb = TextEncoder(models.resolve(cfg).text_encoder, cfg.models.cache_dir, cfg.max_text_length).encode(prompts + [""])
    sched = components.load_scheduler(str(run / "export"))
    last = components.load_unet(meta["base"])
    last.load_state_dict(load_file(str(run / "checkpoints" / f"checkpoint-{a.checkpoint:06d}" / "model.safetensors")))
    out = {"seeds": a.seeds, "sampler_steps": a.steps}
    for name, unet in ((f"export (step {meta.get('best_checkpoint', {}).get('step')})",
                        components.load_unet(str(run / "export"))), (f"checkpoint step {a.checkpoint}", last)):
        unet.eval()
        imgs = []
        for prompt in prompts:
            e = emb[prompt].expand(len(seeds), -1, -1)
            imgs.append(sampling.sample(unet, sched, e, emb[""], a.steps, cfg.stage1.sample.guidance_scale,
                                        [torch.Generator().manual_seed(s) for s in seeds],
                                        resolution=unet.config.sample_size))
        out[name] = {"fidelity": measure.fidelity(imgs[0]), "drift": measure.fidelity(imgs[1]),
                     "diversity_bits": round(measure.entropy(imgs[1]), 3)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
