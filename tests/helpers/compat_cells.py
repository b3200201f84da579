"""Train several cells of cascade/compat.py's table in ONE launch: `python compat_cells.py JOBS.json` for
the one-process cells and references, `torchrun --nproc_per_node 2 compat_cells.py JOBS.json` for the
engines. JOBS.json: {"common": [train args], "out": folder, "jobs": [{"name", "engine", "sets",
"reference", optional "library" and "args"}]}. Each job is `cascade train stage1` with its engine's environment (what
`accelerate launch --config_file configs/accelerate/X.yaml` exports; FSDP forced on gloo as train_engine.py does).

Every rank draws rank 0's data, so the averaged gradient of N processes is the one-process gradient and
every engine's update can be compared with a one-process reference run. A reference job builds the
library's own optimizer (torch AdamW, torchao's or else bitsandbytes' AdamW8bit, prodigyopt Prodigy,
transformers Adafactor) in place of cascade's, on fp32 weights. Results: OUT/results.json (rank 0), {name: exit
code}."""
import functools
import importlib.util
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import train_engine  # noqa: E402  (ENV, force_fsdp_on_cpu: the FSDP-on-gloo setting)

ENGINE_ENV = {"single": {}, "ddp": {}, "fsdp2": train_engine.ENV["fsdp"], "zero2": train_engine.ENV["deepspeed2"],
              "zero3": train_engine.ENV["deepspeed3"],
              "zero2-offload": {**train_engine.ENV["deepspeed2"], "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}}
ALL_KEYS = {k for env in ENGINE_ENV.values() for k in env}


def reference_build(params, cfg, *args, library=None, **kwargs):
    """The library optimizer the cell names, with the cell's lr and weight decay (no cascade code);
    `library="bitsandbytes"`: bitsandbytes' 8-bit AdamW even where torchao is installed (the DeepSpeed cells')."""
    import torch

    params = list(params)
    name = "adamw8bit" if cfg.use_8bit_adam else cfg.optimizer
    lr, wd = cfg.learning_rate, cfg.weight_decay
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=False), "reference-adamw"
    if name == "adamw8bit" and params[0].dtype == torch.float32 and importlib.util.find_spec("torchao") is not None \
            and library != "bitsandbytes":
        from torchao.optim import AdamW8bit  # what cascade steps 8-bit AdamW with where torchao is installed

        return AdamW8bit(params, lr=lr, weight_decay=wd), "reference-adamw8bit-torchao"
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=wd), "reference-adamw8bit"
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=lr, weight_decay=wd), "reference-prodigy"
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=lr, weight_decay=wd, scale_parameter=False, relative_step=False,
                     warmup_init=False), "reference-adafactor"


def main():
    spec = json.loads(Path(sys.argv[1]).read_text())
    from accelerate.state import AcceleratorState

    from cascade.cli.main import main as cascade_main
    from stages import trainer
    from stages.optimizers import factory

    rank0 = trainer.step_generator
    trainer.step_generator = lambda seed, step, rank: rank0(seed, step, 0)  # every rank: rank 0's data
    fsdp_forced = False
    results, built = {}, factory.build
    for job in spec["jobs"]:
        for key in ALL_KEYS:
            os.environ.pop(key, None)
        os.environ.update(ENGINE_ENV[job["engine"]])
        if job["engine"] == "fsdp2" and not fsdp_forced:
            train_engine.force_fsdp_on_cpu()  # patches Accelerator.__init__; only acts with ACCELERATE_USE_FSDP
            fsdp_forced = True
        AcceleratorState._reset_state(True)
        factory.build = functools.partial(reference_build, library=job.get("library")) if job.get("reference") else built
        sets = [x for s in job["sets"] for x in ("--set", s)]
        try:  # a crash is recorded and the walk goes on (the common args give the process group a short timeout)
            results[job["name"]] = cascade_main(["train", "stage1", *spec["common"], *sets, *job.get("args", []),
                                                 "--output", str(Path(spec["out"]) / job["name"])])
        except Exception as e:  # noqa: BLE001
            results[job["name"]] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if int(os.environ.get("RANK", "0")) == 0:
        (Path(spec["out"]) / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
