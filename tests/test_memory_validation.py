"""The planner's command phases beyond the training step (issue 26): chained validation with its partner
stage and both prompts, the advice when validation is the peak, and the ZeRO buckets cascade sets."""
from dataclasses import replace

import pytest
import torch

from cascade.perf import command_plan, planner

pytestmark = pytest.mark.usefixtures("one_thread")


def _fake_inference(calls):
    def inference(model, batch, dtype="float16", text_len=77):
        calls.append((model, batch, dtype))
        return (1000 if model.startswith("partner") else 100) * batch + (7000 if model.startswith("partner") else 4000)
    return inference


STEP = {"params_total": 1000, "params_trainable": 1000, "largest_trainable": 10,
        "bytes": {"params": 4000, "grads": 0, "optimizer": 2000, "activations_at_peak": 500, "peak": 9000}}


def test_validation_counts_the_chained_partner_and_both_prompts():
    """Stage I validation samples 2n images ("a [V] dog" and "a dog"), then the frozen stage II upsamples
    all 2n while the training state (weights + optimizer state) stays on the device; stage II's
    partner (stage I) samples n class images in batches of stage1.sample.batch_size."""
    calls = []
    plan = planner.Plan("tiny-stage1", weights_dtype="float32")
    val = command_plan.ValidationPlan(1, images=4, partner="partner-ii", partner_dtype="float16")
    ph = command_plan.command_phases(plan, STEP, "float16", 4, val, "cpu", inference=_fake_inference(calls))
    assert ("tiny-stage1", 8, "float32") in calls and ("partner-ii", 8, "float16") in calls
    assert ph["validation_own"] == 6000 + (100 * 8 + 4000) - 4000  # the trained weights are counted once
    assert ph["validation_partner"] == 6000 + 1000 * 8 + 7000
    off = command_plan.command_phases(plan, STEP, "float16", 4, replace(val, partner=None), "cpu",
                                      inference=_fake_inference([]))
    assert "validation_partner" not in off
    s2 = command_plan.ValidationPlan(2, images=6, partner="partner-i", photos=2, partner_batch=4)
    assert s2.own_batch() == 8 and s2.partner_images() == 4 and replace(s2, partner=None).own_batch() == 2


def test_validation_advice_names_the_chain_and_smaller_grids():
    """When a validation phase is the command's peak, the advice is about validation (chain off, fewer
    images), not the training-step ladder, and it says what each option leaves."""
    from cascade.perf import planner_report

    plan = planner.Plan("tiny-stage1", weights_dtype="float32")
    inference = _fake_inference([])
    val = command_plan.ValidationPlan(1, images=4, partner="partner-ii")
    phases = command_plan.command_phases(plan, STEP, "float16", 4, val, "cpu", inference=inference)
    assert max(phases, key=phases.get) == "validation_partner"  # 21000 bytes
    gpu = 2**30 + 1.05 * 17000  # fits a peak of 17000 bytes
    advice = planner_report.advise_command(plan, phases, "cpu", gpu, False, step=STEP, val=val, inference=inference)
    options = {o["switch_on"]: o for o in advice["validation_options"]}
    assert options["stage1.validation.chain=false"]["fits"]  # own sampling only: 6800
    assert options["stage1.train.validation_images=2"]["command_peak"] == 6000 + 1000 * 4 + 7000  # 17000: fits
    assert advice["fits"] and advice["switch_on"] == ["stage1.validation.chain=false"]


def test_validation_plan_from_the_if_xl_preset():
    from cascade.config import load_config
    from cascade.perf import planner_report

    cfg = load_config("if-xl")
    v1, v2 = planner_report.validation_plan(cfg, 1), planner_report.validation_plan(cfg, 2)
    assert (v1.partner, v1.own_batch(), v1.partner_images()) == ("if-ii-l", 8, 8)
    assert (v2.partner, v2.own_batch(), v2.partner_images()) == ("if-i-xl", 5, 4)


def test_zero_buckets_are_set_and_counted():
    """Without bucket keys DeepSpeed allocates a 5e8-element reduce bucket (1 GB at bf16); cascade writes
    its own sizes into ZeRO-1/2 configs (a user's value is kept) and the planner counts them plus the
    offload's largest-parameter gradient buffer."""
    from cascade.perf import engine_buffers
    from stages import engines

    conf = engines.fill_deepspeed_config({"zero_optimization": {"stage": 2}}, 4, 1, 1, 0.0, 64, True)
    assert conf["zero_optimization"]["reduce_bucket_size"] == engines.ZERO_BUCKETS["zero_optimization.reduce_bucket_size"]
    assert conf["zero_optimization"]["overlap_comm"] is False
    kept = engines.fill_deepspeed_config({"zero_optimization": {"stage": 2, "reduce_bucket_size": 123}}, 4, 1, 1, 0.0,
                                         64, True)
    assert kept["zero_optimization"]["reduce_bucket_size"] == 123
    params = [torch.empty(300), torch.empty(1000)]
    assert engine_buffers.zero_offload_bytes(params) == 2 * 50_000_000 + 2 * 1000
    default = {"zero_optimization.reduce_bucket_size": 500_000_000}  # DeepSpeed's default
    assert engine_buffers.zero_offload_bytes(params, default) == 1_000_000_000 + 2000
    step = planner.trace_step(planner.Plan("tiny-stage1", batch=1, prior=False, autocast=None, text_len=8, resolution=16,
                               offload=True))
    assert step["bytes"]["grads"] >= engine_buffers.zero_offload_bytes([torch.empty(step["largest_trainable"])])


def test_validation_advice_moves_t5_when_the_chain_off_leaves_t5_the_peak():
    """IF-I-XL LoRA at 12 GB: with the chain off, T5's phase becomes the peak; the option says so and
    moves T5 to the CPU too (else no option would fit)."""
    from cascade.perf import planner_report

    plan = planner.Plan("tiny-stage1", weights_dtype="float32")
    inference = _fake_inference([])
    val = command_plan.ValidationPlan(1, images=4, partner="partner-ii")
    phases = command_plan.command_phases(plan, STEP, "float16", 4, val, "cpu", inference=inference)
    phases["t5_encode"] = 18000  # over the budget, below the partner phase (21000)
    gpu = 2**30 + 1.05 * 17000
    advice = planner_report.advise_command(plan, phases, "gpu", gpu, False, step=STEP, val=val, inference=inference)
    assert advice["fits"] and advice["switch_on"] == [f"stage1.validation.chain=false + {planner_report.T5_TO_CPU}"]
    assert advice["command_peak"] == 9000  # the training step


def test_advice_shrinks_the_step_then_validation_when_both_are_over():
    """IF-I-XL LoRA at 12 GB under CUDA rules: the step (10.9 GB) and the chained validation (15.8) are
    both over; the ladder halves the batch for the step, then the validation options follow."""
    from cascade.perf import planner_report

    plan = planner.Plan("tiny-stage1", batch=4, weights_dtype="bfloat16", checkpointing="full", use_8bit_adam=True,
                        in_backward=True)
    inference = _fake_inference([])
    val = command_plan.ValidationPlan(1, images=4, partner="partner-ii")
    phases = command_plan.command_phases(plan, STEP, "float16", 4, val, "cpu", inference=inference)
    phases["train_step"] = 19000  # over the budget
    fake = lambda p: {"bytes": {"peak": 19000 * p.batch // 4}}
    gpu = 2**30 + 1.05 * 17000
    advice = planner_report.advise_command(plan, phases, "cpu", gpu, False, fake, step=STEP, val=val,
                                           inference=inference)
    assert advice["fits"] and advice["switch_on"] == ["train.batch_size=2", "stage1.validation.chain=false"]
    assert advice["command_peak"] == 9500  # the halved step; the own grid is 6800
