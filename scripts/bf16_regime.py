"""Can bf16 master weights hold a fine-tune whose per-step update is 1e-3 .. 1e-4 of a bf16 ulp (the
if-xl preset's stage I regime: lr 1e-7, 1000 steps)? Measured on the toy world's stage I.

Each variant fine-tunes the committed toy stage I UNet on the toy subject (DreamBooth: instance +
prior images, the hybrid-free epsilon loss) with the same data, noise and timesteps:
- fp32: fp32 master weights, torch AdamW;
- bf16-sr / bf16-kahan / bf16-nearest: bf16 master weights stepped by LowPrecisionAdamW (the
  trainer's optimizer; gradients handed over in bf16 as bf16 weights give them). The forward runs in
  fp32 on the bf16 values (bf16 compute on this CPU is ~15x slower; what is measured is whether the
  weights can *hold* the update, not bf16 compute noise, which autocast adds on any master dtype).
The learning rate is set from the typical weight: lr = ratio x ulp_bf16(median |w|).

Reported per variant and seed: held-out loss change vs the base model (fixed eval noise), the weight
change's relative error vs the fp32 run, the same for the fp16 export (what IF loads), and the
readers' fidelity of "a [V] toy" samples. Usage:
  PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/bf16_regime.py --ratio 1e-3 --steps 400 --seeds 0,1,2 --out OUT
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch


def ulp_bf16(x: float) -> float:
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7)


def load(cache_dir: str):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from cascade.text import TextEncoder
    from cascade.toy import weights, world

    root = weights.toy_root() / "stage1"
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet").eval()
    sched = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    prompts = ["a jaw toy", "a toy", ""]
    emb = TextEncoder(str(root), cache_dir, device="cpu").encode(prompts)
    subject = world.to_lowres(world.to_tensor(world.subject_photos()))
    prior = world.to_lowres(world.dataset(64, seed=123)[1])
    held_out = world.to_lowres(world.to_tensor([world.render(t) for t in world.subject_toys()[::-1]]).flip(-1))
    return unet, sched, emb, subject, prior, held_out


def loss_on(unet, math_, x0, text, gen_seed: int, n_draws: int = 8):
    """Epsilon MSE on x0 with fixed noise/timesteps (eval: same draws for every model)."""
    g = torch.Generator().manual_seed(gen_seed)
    total = 0.0
    with torch.no_grad():
        for _ in range(n_draws):
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
            out = unet(math_.q_sample(x0, noise, t), t, encoder_hidden_states=text.expand(x0.shape[0], -1, -1)).sample
            total += (out[:, :3] - noise).pow(2).mean().item()
    return total / n_draws


def finetune(base, variant: str, lr: float, steps: int, seed: int, data):
    from stages.losses import DiffusionMath
    from stages.optimizers.low_precision import LowPrecisionAdamW

    sched, emb, subject, prior = data
    math_ = DiffusionMath(sched.alphas_cumprod)
    unet = copy.deepcopy(base).train()
    p32 = list(unet.parameters())
    if variant == "fp32":
        opt, p16 = torch.optim.AdamW(p32, lr=lr, weight_decay=0.0), None
    else:
        p16 = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in p32]
        with torch.no_grad():
            for a, b in zip(p32, p16):
                a.copy_(b)  # the bf16 start is the model both start from... see `start` below
        opt = LowPrecisionAdamW(p16, lr=lr, weight_decay=0.0, rounding=variant.split("-")[1], states="fp32",
                                seed=seed)
    text = torch.cat([emb["a jaw toy"].expand(4, -1, -1), emb["a toy"].expand(4, -1, -1)])
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x0 = torch.cat([subject[torch.randint(0, len(subject), (4,), generator=g)],
                        prior[torch.randint(0, len(prior), (4,), generator=g)]])
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (8,), generator=g)
        out = unet(math_.q_sample(x0, noise, t), t, encoder_hidden_states=text).sample
        loss = (out[:, :3] - noise).pow(2).mean()
        loss.backward()
        if p16 is not None:
            for a, b in zip(p32, p16):
                b.grad = a.grad.to(torch.bfloat16)
                a.grad = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        if p16 is not None:
            with torch.no_grad():
                for a, b in zip(p32, p16):
                    a.copy_(b)
    return unet.eval()


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def fidelity(unet, sched, emb, n: int, seed: int) -> float:
    from cascade.toy import measure, world
    from stages.sampling import sample

    gens = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]
    with torch.no_grad():
        imgs = sample(unet, sched, emb["a jaw toy"].expand(n, -1, -1), emb[""], 25, 4.0, gens, world.LO)
    return measure.fidelity(imgs)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=1e-3, help="per-step update / bf16 ulp of the median |w|")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default="fp32,bf16-stochastic,bf16-kahan,bf16-nearest")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--cache-dir", default="~/.cache/cascade")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from stages.losses import DiffusionMath

    base, sched, emb, subject, prior, held_out = load(a.cache_dir)
    # both start from the bf16-rounded base, so every difference is the update, not the start
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(p.to(torch.bfloat16))
    w0 = flat(base)
    med = w0.abs().median().item()
    lr = a.ratio * ulp_bf16(med)
    math_ = DiffusionMath(sched.alphas_cumprod)
    base_loss = loss_on(base, math_, held_out, emb["a jaw toy"], 99)
    base_prior = loss_on(base, math_, prior[:16], emb["a toy"], 98)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    header = dict(median_abs_w=med, ulp_bf16_at_median=ulp_bf16(med), lr=lr, ratio=a.ratio, steps=a.steps,
                  base_heldout_loss=base_loss, base_prior_loss=base_prior,
                  base_fidelity=fidelity(base, sched, emb, a.samples, 0))
    print(json.dumps(header), flush=True)
    for seed in [int(s) for s in a.seeds.split(",")]:
        ref = None
        for variant in a.variants.split(","):
            t0 = time.time()
            m = finetune(base, variant, lr, a.steps, seed, (sched, emb, subject, prior))
            w = flat(m)
            row = dict(seed=seed, variant=variant, seconds=round(time.time() - t0, 1),
                       heldout_loss_change=loss_on(m, math_, held_out, emb["a jaw toy"], 99) - base_loss,
                       prior_loss_change=loss_on(m, math_, prior[:16], emb["a toy"], 98) - base_prior,
                       fidelity=fidelity(m, sched, emb, a.samples, 0),
                       update_norm=(w - w0).norm().item(),
                       frac_weights_changed=(w != w0).float().mean().item())
            w16 = w.half().float()
            if variant == "fp32":
                ref = (w - w0, w16 - w0.half().float())
                # the best any bf16 storage could do: the fp32 result rounded to bf16 once, at the end
                best = w.bfloat16().float()
                rows.append(dict(seed=seed, variant="fp32-rounded-to-bf16-at-end", frac_weights_changed=(best != w0)
                                 .float().mean().item(), update_rel_error_vs_fp32=((best - w0) - ref[0]).norm().item()
                                 / ref[0].norm().item()))
                print(json.dumps(rows[-1]), flush=True)
            row["update_rel_error_vs_fp32"] = ((w - w0) - ref[0]).norm().item() / ref[0].norm().item()
            row["fp16_export_rel_error_vs_fp32_update"] = ((w16 - w0.half().float()) - ref[0]).norm().item() / \
                ref[0].norm().item()
            rows.append(row)
            print(json.dumps(row), flush=True)
            (out / "results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
