"""The memory planner (fake-tensor trace) against real measured runs, and `cascade bench` JSON."""
import functools
import json

import pytest
import torch

from cascade.perf import command_plan, planner
from cascade.config import Train
from stages import activation_ckpt, setup
from stages.optimizers import factory


pytestmark = pytest.mark.usefixtures("one_thread")
RES = 32  # the tiny stage I's inputs at half its 64 px: the same accounting, a quarter of the (real) compute


@functools.lru_cache(maxsize=None)
def _trace(plan: planner.Plan) -> dict:
    """Plans are frozen: each is traced once per session, whichever test asks first."""
    return planner.trace_step(plan)


def _plan(**opts) -> planner.Plan:
    """The tests' common plan: batch 2 + 2 prior, 16 text tokens, at RES, CPU fp32 activations."""
    return planner.Plan("tiny-stage1", batch=2, prior=True, text_len=16, resolution=RES, **{"autocast": None, **opts})


PRESET = dict(weights_dtype="bfloat16", checkpointing="full", use_8bit_adam=True, in_backward=True)  # the presets'


def _real_state(opt) -> list:
    """The state tensors, listed per optimizer kind by hand (independent of factory.state_tensors):
    torch/bitsandbytes dicts of tensors, LowPrecisionAdamW's 8-bit moments (q + absmax), and the
    per-parameter optimizers that optimizer-in-backward keeps."""
    out = []
    for o in (opt.inner.values() if isinstance(opt, factory.InBackwardOptimizer) else [opt]):
        for st in o.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    out.append(v)
                elif hasattr(v, "q"):
                    out += [v.q, v.qs.absmax]
    return list({id(t): t for t in out}.values())  # bitsandbytes shares its quantization maps


def _measured_peak(plan: planner.Plan) -> tuple[int, int]:
    """Real tensors, real optimizer (bitsandbytes for 8-bit), two steps; (peak tensor bytes of the
    second, optimizer state bytes)."""
    from cascade.offline.tiny import build_stage1_unet

    torch.manual_seed(0)
    unet = build_stage1_unet().to(getattr(torch, plan.weights_dtype))
    if plan.lora_rank:
        setup.add_lora(unet, plan.lora_rank, 0)
    activation_ckpt.apply(unet, plan.checkpointing)
    params = [p for p in unet.parameters() if p.requires_grad]
    cfg = Train(weights_dtype=plan.weights_dtype, use_8bit_adam=plan.use_8bit_adam, fused_optimizer=False,
                optimizer_in_backward=plan.in_backward, max_grad_norm=0.0)
    opt, _ = factory.build(params, cfg)
    n = plan.batch * 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, plan.resolution, plan.resolution, generator=g).to(params[0].dtype)
    t = torch.randint(0, 1000, (n,), generator=g)
    enc = torch.randn(n, plan.text_len, 32, generator=g).to(params[0].dtype)

    def step():
        out = unet(x, t, encoder_hidden_states=enc, return_dict=False)[0]
        (out.float()[:, :3] - x.float()).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # creates the optimizer state
    state = _real_state(opt)
    assert state, "the optimizer holds no state after a step"
    tracker = planner._tracker(unet)  # a MemTracker that skips gradient hooks on frozen (LoRA base) weights
    tracker.track_external(unet, opt, *state)
    with tracker:
        step()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"], sum(
        t.numel() * t.element_size() for t in state)


@pytest.mark.parametrize("opts", [
    dict(),  # naive: fp32, AdamW
    dict(use_8bit_adam=True, checkpointing="resnets"),  # real bitsandbytes AdamW8bit vs the stand-in
    PRESET,
    dict(weights_dtype="bfloat16", checkpointing="full", lora_rank=4),  # LoRA on a bf16 frozen base
], ids=["naive", "8bit", "bf16-full-inbackward", "lora"])
def test_planner_estimate_within_10_percent_of_measured(opts):
    plan = _plan(**opts)
    estimate = _trace(plan)["bytes"]
    measured, state = _measured_peak(plan)
    assert abs(estimate["peak"] - measured) / measured < 0.10, (estimate["peak"], measured)
    # the state must be counted for optimizers kept in backward hooks and for 8-bit moments too
    assert abs(estimate["optimizer"] - state) / state < 0.05, (estimate["optimizer"], state)


def test_planner_orders_the_options():
    naive, best = _trace(_plan()), _trace(_plan(**PRESET))
    nb, bb = naive["bytes"], best["bytes"]
    n = naive["params_trainable"]
    assert 8 * n <= nb["optimizer"] <= 8 * n + 4 * 1000  # AdamW: two fp32 moments (+ a step scalar per tensor)
    assert bb["params"] == 2 * best["params_total"]  # bf16 weights
    assert bb["optimizer"] < nb["optimizer"] / 3  # 8-bit moments
    assert bb["peak"] < nb["peak"]


def test_parse_size_and_fit():
    assert planner.parse_size("40GB") == 40e9 and planner.parse_size("24GiB") == 24 * 2**30
    assert planner.fits(int(10e9), 40e9)[0] and not planner.fits(int(39.5e9), 40e9)[0]
    from stages.errors import InputError

    with pytest.raises(InputError, match="gpu-memory"):
        planner.parse_size("lots")


def test_bench_tiny_writes_valid_json(tmp_path, capsys):
    from cascade.cli.main import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--config", "tiny", "--steps", "1", "--warmup", "0", "--sample-steps", "1", "--resolution", "32",
                 "--batch", "1", "--compare", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["command"].startswith("cascade") and report["device"].startswith("cpu")
    assert report["versions"]["torch"] == torch.__version__.split("+")[0] or report["versions"]["torch"]
    assert [r["variant"]["name"] for r in report["results"]] == ["config", "naive"]
    for r in report["results"]:
        assert r["train"]["flops_per_step"] > 0 and r["train"]["steps_per_s"] > 0
        assert r["peak_memory_bytes"] > 0 and r["sample"]["images_per_s"] > 0
        assert r["train"]["mfu"] is None  # no GPU: no MFU
    assert report["results"][1]["variant"]["t5_resident"] is True
    assert "|" in report["markdown"] and report["markdown"] in capsys.readouterr().out


def test_estimate_memory_cli_fit_verdict(capsys, tmp_path):
    from cascade.cli.main import main

    assert main(["bench", "--estimate-memory", "--config", "tiny", "--gpu-memory", "40GB", "--batch", "1",
                 "--set", "stage1.train.lora_rank=2", "--output", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "phases (GB)" in out and "fits 40GB" in out
    report = json.loads((tmp_path / "plan.json").read_text())
    assert report["command"].endswith("--gpu-memory 40GB --set stage1.train.lora_rank=2")  # reproducible
    assert report["plan"]["plan"]["lora_rank"] == 2
    # the tiny cascade's phases are the tiny models' (its T5 is the tiny one, not T5-XXL's 9.5 GB), and
    # the export holds no second copy of the weights on the device
    assert report["command_peak"] < 0.2e9 and report["phases"]["t5_encode"] < 0.1e9
    assert report["phases"]["export"] <= report["phases"]["train_step"]


def test_advice_switches_options_on_until_the_step_fits():
    """`--gpu-memory` advice: options are switched on in the ladder's order until the step fits the
    budget (after the context and slack); a budget nothing fits gets no plan; DDP never gets
    optimizer-in-backward. The trace is a stand-in whose bytes fall with each option (the real traces'
    order is test_planner_orders_the_options), so every rung of the ladder is exercised."""
    saved = {"weights_dtype": 400, "checkpointing": 200, "use_8bit_adam": 150, "in_backward": 100}
    traced = []

    def trace(plan):
        traced.append(plan)
        peak = 1000 - sum(v for k, v in saved.items() if getattr(plan, k) not in ("float32", "none", False))
        return {"bytes": {"peak": peak * plan.batch // 4 * 2**20}}

    plan = planner.Plan("tiny-stage1", batch=4)
    context = 2**30
    mb = lambda n: (context + n * 2**20) * 1.05 + 1  # a budget the step of n MiB just fits
    better, switched, result = planner.advise(plan, mb(400), trace)
    assert switched == ["train.weights_dtype=bfloat16", "train.gradient_checkpointing=true (scope full)"]
    assert better.weights_dtype == "bfloat16" and better.checkpointing == "full" and not better.use_8bit_adam
    assert result["bytes"]["peak"] == 400 * 2**20 and len(traced) == 2
    order = [text for _, _, text in planner.LADDER]
    better, switched, _ = planner.advise(plan, mb(75), trace)  # every option, then the batch halved
    assert switched == order[:4] + ["train.batch_size=2"] and better.batch == 2
    better, switched, _ = planner.advise(plan, mb(75), trace, ddp=True)  # no in-backward under DDP
    assert "train.optimizer_in_backward=true" not in switched and better.batch == 1 and not better.in_backward
    assert planner.advise(plan, context + 1e5, trace)[0] is None  # 0.1 MB: nothing fits
    assert not planner.fits(1000 * 2**20, mb(400))[0] and planner.fits(400 * 2**20, mb(400))[0]


def test_t5_phase_counts_wo_in_fp32():
    """transformers keeps T5's feed-forward output projections (`wo`) in fp32 when it loads in fp16."""
    from cascade.perf import arch

    t5 = arch.build_t5()
    n = arch.n_params(t5)
    n_wo = sum(p.numel() for name, p in t5.named_parameters() if ".wo." in name)
    assert 1.0e9 < n_wo < 1.02e9  # 24 layers x 4096 x 10240
    fp16 = command_plan.t5_device_bytes("if-i-xl", "float16")
    assert fp16 == 2 * n + 2 * n_wo  # 11.6 GB, not 9.5 GB
    assert command_plan.t5_device_bytes("if-i-xl", "bfloat16") == 2 * n  # bf16 loads keep wo in bf16
    assert 4 * n_wo < command_plan.t5_device_bytes("if-i-xl", "float16", "8bit") < fp16 - 2 * (n - n_wo) // 3
    assert command_plan.t5_device_bytes("if-i-xl", "float16", "cpu") == 0
    with torch.device("meta"):
        from transformers import T5Config, T5EncoderModel

        ref = T5EncoderModel(T5Config(**arch.load(arch.T5)["t5"]))
    assert T5EncoderModel._keep_in_fp32_modules == ["wo"] and arch.n_params(ref) == n


def test_ddp_plan_holds_every_gradient():
    plan = _plan(**PRESET)
    one = _trace(plan)  # shared with the tests above
    ddp = planner.trace_step(planner.ddp_plan(plan))
    assert ddp["plan"]["in_backward"] is False
    assert ddp["bytes"]["grads"] == 2 * ddp["params_trainable"] > 4 * one["bytes"]["grads"]


def test_8bit_state_starts_without_an_fp32_copy(monkeypatch):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    from stages.optimizers import low_precision

    sizes, real = [], bnbf.quantize_blockwise
    monkeypatch.setattr(bnbf, "quantize_blockwise", lambda x, *a, **k: sizes.append(x.numel()) or real(x, *a, **k))
    st = low_precision._State8bit(torch.empty(100_000), signed=True)
    assert max(sizes) <= low_precision._BLOCK  # was one fp32 zero tensor of the whole size
    assert st.q.numel() == 100_000 and float(st.get().abs().max()) == 0.0


def test_advice_moves_t5_to_the_cpu_when_t5_is_the_peak():
    """IF-I-XL LoRA at 12 GB: T5's phase (11.6 GB) is the peak, so the advice is T5 on the CPU, not a
    smaller batch (which cannot lower T5's phase); the step ladder runs only if the step is still over."""
    from cascade.perf import planner_report

    gb = 1e9
    plan = planner.Plan("tiny-stage1", batch=4)
    phases = {"t5_encode": 11.6 * gb, "class_images": 9.3 * gb, "train_step": 10.2 * gb, "validation": 9.3 * gb,
              "export": 8.6 * gb}
    traced = []
    fake = lambda p: traced.append(p) or {"bytes": {"peak": 10.2 * gb * p.batch / 4}}
    advice = planner_report.advise_command(plan, phases, "gpu", 12 * gb, False, fake)
    assert advice["switch_on"] == [planner_report.T5_TO_CPU] and advice["fits"] and not traced
    assert advice["command_peak"] == 10.2 * gb
    # T5 already on the CPU and the step over the budget: the ladder, and the verdict counts every phase
    advice = planner_report.advise_command(plan, {**phases, "t5_encode": 0, "train_step": 13 * gb}, "cpu", 12 * gb,
                                           False, fake)
    assert planner_report.T5_TO_CPU not in advice["switch_on"] and traced and advice["fits"]
    assert advice["command_peak"] == 10.2 * gb  # the traced step with the first rung switched on
    # a phase the ladder cannot shrink (class images at 12.5 GB) leaves no plan
    advice = planner_report.advise_command(plan, {**phases, "class_images": 12.5 * gb}, "gpu", 12 * gb, False, fake)
    assert not advice["fits"] and advice["plan"] is None
    assert planner_report.T5_TO_CPU not in advice["switch_on"]  # T5 is not the peak there: moving it cannot help


def _saved_dtypes(rules: bool) -> dict:
    """Dtypes autograd saves for backward in GroupNorm -> SiLU -> conv -> softmax -> nearest upsample
    under bf16 autocast, with CUDA's rules emulated or the CPU's, and the output dtype of each op."""
    from cascade.perf.cuda_autocast import cuda_rules

    torch.manual_seed(0)
    gn, conv, ln = torch.nn.GroupNorm(2, 8), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.LayerNorm(4)
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    saved = []
    with cuda_rules(rules), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        g = gn(x.to(torch.bfloat16))
        n_gn = len(saved)
        out = {"group_norm": g.dtype, "silu": torch.nn.functional.silu(g).dtype, "conv": conv(g).dtype,
               "layer_norm": ln(conv(g)).dtype, "softmax": conv(g).softmax(-1).dtype,
               "interpolate": torch.nn.functional.interpolate(conv(g), scale_factor=2.0, mode="nearest").dtype,
               "avg_pool": torch.nn.functional.avg_pool2d(conv(g), 2).dtype}
    return {"ops": out, "group_norm_saved_input": saved[0], "n_gn": n_gn}


def test_cuda_autocast_rules_run_norms_and_softmax_in_fp32():
    """CUDA autocast (torch's AT_FORALL_FP32 / FP32_SET_OPT_DTYPE lists) runs group_norm, layer_norm,
    softmax and nearest upsampling in fp32, and group_norm saves an fp32 copy of its input for
    backward; CPU autocast keeps them in bf16. The planner's emulation must give CUDA's dtypes."""
    bf16, fp32 = torch.bfloat16, torch.float32
    cpu, cuda = _saved_dtypes(False), _saved_dtypes(True)
    assert cpu["ops"] == dict(group_norm=bf16, silu=bf16, conv=bf16, layer_norm=bf16, softmax=bf16,
                              interpolate=bf16, avg_pool=bf16)
    assert cuda["ops"] == dict(group_norm=fp32, silu=fp32, conv=bf16, layer_norm=fp32, softmax=fp32,
                               interpolate=fp32, avg_pool=bf16)
    assert cpu["group_norm_saved_input"] == bf16 and cuda["group_norm_saved_input"] == fp32


def test_planner_traces_cuda_rules_not_cpu_rules():
    """The fp32 norms/softmax of CUDA autocast add saved activations; the plan for a CUDA target counts
    them, with and without checkpointing (recomputation in backward follows the same rules)."""
    for ckpt in ("none", "full"):
        cpu_rules, cuda_rules = (_trace(planner.Plan("tiny-stage1", batch=1, prior=True, weights_dtype="bfloat16",
                                                     checkpointing=ckpt, text_len=16, resolution=RES,
                                                     autocast_rules=r))["bytes"] for r in ("cpu", "cuda"))
        assert cuda_rules["activations_at_peak"] > 1.2 * cpu_rules["activations_at_peak"], ckpt
        assert cuda_rules["peak"] > cpu_rules["peak"] and cuda_rules["params"] == cpu_rules["params"]
    assert planner.Plan("if-i-xl").autocast_rules == "cuda"  # `cascade bench --estimate-memory` plans for CUDA
