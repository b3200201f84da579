"""The engine glue without a process group: DeepSpeed's config and optimizer conventions, the LR
schedule per optimizer step, sharded exports, process-group settings, stage III's device."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from cascade.config import load_config
from stages import engines, setup
from stages.errors import InputError


def train_cfg(**kw):
    cfg = load_config("tiny").stage1.train
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_deepspeed_config_fills_what_a_dataloader_would():
    # what `accelerate config` writes for ZeRO-3 without a file, plus "auto" bucket sizes from a user file
    conf = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
            "gradient_clipping": "auto", "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                                               "stage3_gather_16bit_weights_on_model_save": False}}
    engines.fill_deepspeed_config(conf, micro_batch=4, grad_accum=2, world_size=8, max_grad_norm=0.5,
                                  hidden_size=1024, client_optimizer=True)
    assert conf["train_micro_batch_size_per_gpu"] == 4 and conf["gradient_accumulation_steps"] == 2
    assert conf["train_batch_size"] == 4 * 2 * 8
    assert conf["gradient_clipping"] == 0.5
    assert conf["zero_optimization"]["reduce_bucket_size"] == 1024 ** 2
    assert conf["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert conf["zero_allow_untested_optimizer"] is True
    # numbers the user wrote are kept, and the batch identity DeepSpeed asserts still holds
    conf = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 2.0, "zero_optimization": {"stage": 2},
            "optimizer": {"type": "AdamW"}}
    engines.fill_deepspeed_config(conf, 4, 1, 2, 1.0, 64, client_optimizer=False)
    assert conf["train_micro_batch_size_per_gpu"] == 1 and conf["train_batch_size"] == 2
    assert conf["gradient_clipping"] == 2.0 and "zero_allow_untested_optimizer" not in conf
    assert "stage3_gather_16bit_weights_on_model_save" not in conf["zero_optimization"]


def _fake_accelerator(ds_config=None):
    plugin = SimpleNamespace(deepspeed_config=ds_config) if ds_config is not None else None
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))


def test_optimizer_and_scheduler_follow_deepspeed_conventions():
    from accelerate.utils import DummyOptim, DummyScheduler

    params = [torch.nn.Parameter(torch.zeros(3))]
    cfg = train_cfg(learning_rate=3e-6, lr_warmup_steps=5, max_steps=40)
    opt, sched, name = engines.make_optimizer_and_scheduler(_fake_accelerator(), params, cfg, setup.make_optimizer)
    assert isinstance(opt, torch.optim.AdamW) and name == "adamw" and sched.get_last_lr() == [0.0]
    # a config with its own optimizer: placeholders carrying our lr, and our warmup built on DeepSpeed's optimizer
    opt, sched, _ = engines.make_optimizer_and_scheduler(_fake_accelerator({"optimizer": {"type": "AdamW"}}), params,
                                                         cfg, setup.make_optimizer)
    assert isinstance(opt, DummyOptim) and opt.lr == 3e-6 and isinstance(sched, DummyScheduler)
    built = sched.lr_scheduler_callable(torch.optim.SGD(params, lr=3e-6))
    lrs = []
    for _ in range(6):
        built.optimizer.step()
        built.step()
        lrs.append(built.get_last_lr()[0])
    assert lrs == pytest.approx([3e-6 * k / 5 for k in (1, 2, 3, 4)] + [3e-6, 3e-6])
    # optimizer and scheduler both in the config: DeepSpeed's WarmupLR gets our warmup and length. On 4
    # processes accelerate writes ceil(total_num_steps / 4) into the config (split_batches off): that must
    # still be max_steps, or the schedule ends 4x too early
    acc = _fake_accelerator({"optimizer": {}, "scheduler": {}})
    acc.num_processes = 4
    opt, sched, _ = engines.make_optimizer_and_scheduler(acc, params, cfg, setup.make_optimizer)
    assert sched.warmup_num_steps == 5 and math.ceil(sched.total_num_steps / acc.num_processes) == 40
    with pytest.raises(InputError, match="scheduler but no optimizer"):
        engines.make_optimizer_and_scheduler(_fake_accelerator({"scheduler": {}}), params, cfg, setup.make_optimizer)


def test_lr_steps_once_per_optimizer_step():
    """With gradient accumulation 2, four micro-steps are two optimizer steps: warmup advances twice."""
    from accelerate.utils import GradientAccumulationPlugin

    acc = engines.make_accelerator(train_cfg(gradient_accumulation_steps=2), "no", None, ".")
    acc.gradient_accumulation_steps = 2  # the state may be shared with earlier tests in this process
    acc.gradient_state.plugin_kwargs.update(GradientAccumulationPlugin(num_steps=2).to_kwargs())
    model = torch.nn.Linear(2, 1)
    opt, sched, _ = engines.make_optimizer_and_scheduler(_fake_accelerator(), list(model.parameters()),
                                                         train_cfg(learning_rate=1.0, lr_warmup_steps=4),
                                                         setup.make_optimizer)
    model, opt, sched = acc.prepare(model, opt, sched)
    for _ in range(4):
        with acc.accumulate(model):
            acc.backward(model(torch.ones(1, 2)).sum())
            opt.step()
            engines.step_lr(acc, sched)
            opt.zero_grad()
    assert sched.get_last_lr() == [0.5]


def test_sharded_export_writes_the_gathered_weights(tmp_path):
    """Under FSDP/DeepSpeed the module on the main process holds shards; the export must be the
    gathered state dict, in diffusers' own layout (one form only)."""
    from accelerate.utils import DistributedType
    from diffusers import UNet2DConditionModel

    from cascade.offline.tiny import build_stage1_unet

    model = build_stage1_unet()
    gathered = {k: torch.full_like(v, 0.25) for k, v in model.state_dict().items()}
    acc = SimpleNamespace(distributed_type=DistributedType.FSDP, unwrap_model=lambda m: m)
    engines.save_full_unet(acc, model, gathered, tmp_path / "unet")
    assert sorted(p.name for p in (tmp_path / "unet").iterdir()) == ["config.json",
                                                                      "diffusion_pytorch_model.safetensors"]
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet").state_dict()
    assert all(torch.equal(loaded[k], gathered[k]) for k in gathered)
    with pytest.raises(RuntimeError, match="does not match"):
        engines.save_full_unet(acc, model, {"nope": torch.zeros(1)}, tmp_path / "bad")


def test_process_group_settings(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert engines.engine() == "ddp"
    assert engines.process_kwargs(77).get("timeout").total_seconds() == 77 * 60
    assert load_config("tiny").distributed_timeout_minutes == engines.DEFAULT_TIMEOUT_MINUTES
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a launched process (torchrun / accelerate launch)
    # accelerate counts DeepSpeed's CPU processes only when told the backend (cpu=True would turn DeepSpeed off)
    assert engines.process_kwargs(5)["backend"] == "gloo" and not engines._cpu_flag()


def test_stage3_offloads_to_this_process_gpu(monkeypatch):
    """enable_model_cpu_offload() without a device puts every process of a multi-GPU run on cuda:0."""
    import diffusers

    from cascade import runner
    from stages import stage3

    seen = {}

    class FakePipe:
        def enable_model_cpu_offload(self, gpu_id=None, device=None):
            seen.update(gpu_id=gpu_id, device=device)

        def set_progress_bar_config(self, **kw):
            pass

    monkeypatch.setattr(diffusers.StableDiffusionUpscalePipeline, "from_pretrained", lambda *a, **k: FakePipe())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # accelerate made GPU 3 this rank's device
    assert runner.device() == torch.device("cuda", 3)
    stage3.upscale("x", [], [], [], 1, 1.0, 20, torch.float32, 1, device=runner.device())
    assert seen["device"] == torch.device("cuda", 3)
    stage3.upscale("x", [], [], [], 1, 1.0, 20, torch.float32, 1)
    assert seen["device"] == torch.device("cuda", 3)


def test_offload_optimizer_goes_through_deepspeed_zero_offload(monkeypatch):
    """train.offload_optimizer: fp32 master weights + Adam states on the host via ZeRO-Offload; refused in
    one line without a DeepSpeed launch, and with settings that would put a master copy on the GPU."""
    from cascade.config import ConfigError

    cfg = train_cfg(offload_optimizer=True)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    with pytest.raises(ConfigError, match="deepspeed-zero2-offload.yaml"):
        load_config("tiny", ["stage1.train.offload_optimizer=true"])
    with pytest.raises(ConfigError, match="offload_optimizer"):
        load_config("tiny", ["stage1.train.offload_optimizer=true", "stage1.train.weights_dtype=bfloat16"])
    conf = {"zero_optimization": {"stage": 2}}
    unet = SimpleNamespace(config=SimpleNamespace(block_out_channels=[32, 64]))
    acc = _fake_accelerator(conf)
    acc.num_processes = 1
    engines.configure_deepspeed(acc, unet, cfg, micro_batch=4)
    assert conf["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert conf["train_micro_batch_size_per_gpu"] == 4


def test_planner_offload_plan_keeps_no_optimizer_state_on_the_device():
    from cascade.perf import planner

    plan = planner.Plan("tiny-stage1", batch=1, text_len=8, offload=True, autocast=None)
    r = planner.trace_step(plan)
    assert r["bytes"]["optimizer"] == 0 and r["bytes"]["params"] >= 2 * r["params_total"]
    assert r["bytes"]["params"] < 2 * r["params_total"] + 4096  # a bf16 module (+ buffers), no fp32 copy
    assert r["host_bytes"] == 16 * r["params_trainable"] and r["plan"]["offload"] is True


def test_offloaded_export_takes_the_fp32_masters(monkeypatch):
    """The bf16 module under ZeRO-Offload is a rounded copy; a fine-tune below a bf16 ulp lives only in the
    fp32 masters, so the export must take those."""
    import deepspeed.utils

    module = torch.nn.Linear(4, 4).to(torch.bfloat16)
    masters = {id(p): torch.full(p.shape, 0.1234567) for p in module.parameters()}
    monkeypatch.setattr(deepspeed.utils, "safe_get_full_fp32_param", lambda p: masters[id(p)])
    acc = _fake_accelerator({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
    acc.unwrap_model = lambda m: m
    sd = engines.with_fp32_masters(acc, module, module.state_dict())
    assert sd["weight"].dtype == torch.float32 and float(sd["weight"][0, 0]) == pytest.approx(0.1234567, abs=1e-8)
    plain = _fake_accelerator({"zero_optimization": {"stage": 2}})
    assert engines.with_fp32_masters(plain, module, module.state_dict())["weight"].dtype == torch.bfloat16
