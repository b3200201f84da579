"""bf16 weights with compensated updates, optimizer-in-backward, full gradient checkpointing, fp16 exports."""
import pytest
import torch

from cascade.config import Train
from stages import activation_ckpt
from stages.optimizers import factory
from stages.optimizers.low_precision import LowPrecisionAdamW, convert_to_variant, stochastic_round

# The stated tolerance: a bf16-weight run with stochastic rounding or Kahan compensation ends within
# 3% of the fp32 run's loss (mean of the last 30 of 150 steps); plain round-to-nearest does not.
TOLERANCE = 0.03


pytestmark = pytest.mark.usefixtures("one_thread")


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    torch.manual_seed(1)
    for p in teacher.parameters():
        p.data = torch.randn(p.shape, generator=g)
    with torch.no_grad():
        y = teacher(x)
    return x, y


def _train(dtype, rounding, steps=150, lr=3e-4):
    x, y = _problem()
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    with torch.no_grad():  # weights of order 1-4: a 1e-4 step is far below bf16's resolution there
        for p in model.parameters():
            p.mul_(8)
    model.to(dtype)
    if dtype == torch.float32:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    else:
        opt = LowPrecisionAdamW(model.parameters(), lr=lr, rounding=rounding, states="fp32", seed=0)
    losses = []
    for _ in range(steps):
        loss = (model(x.to(dtype)).float() - y).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_bf16_updates_track_fp32_loss_within_tolerance():
    ref = _train(torch.float32, None)
    tail = lambda l: sum(l[-30:]) / 30  # noqa: E731
    assert tail(ref) < 0.9 * ref[0]  # the fp32 run really learns
    for rounding in ("stochastic", "kahan"):
        got = _train(torch.bfloat16, rounding)
        assert abs(tail(got) - tail(ref)) / tail(ref) < TOLERANCE, (rounding, tail(got), tail(ref))
    nearest = _train(torch.bfloat16, "nearest")
    assert abs(tail(nearest) - tail(ref)) / tail(ref) > TOLERANCE  # the failure the switches fix


def test_stochastic_rounding_is_unbiased():
    x = torch.full((200_000,), 1.0 + 2 ** -10)  # a quarter of the way between bf16 1.0 and 1.0078125
    r = stochastic_round(x, torch.bfloat16, torch.Generator().manual_seed(0)).float()
    assert set(r.unique().tolist()) == {1.0, 1.0078125}
    assert abs(r.mean().item() - x[0].item()) < 2e-5
    assert x.to(torch.bfloat16).float().unique().tolist() == [1.0]  # nearest always rounds down


def test_low_precision_adamw_equals_torch_adamw_in_fp32():
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 8)
    b = torch.nn.Linear(8, 8)
    b.load_state_dict(a.state_dict())
    oa = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    ob = LowPrecisionAdamW(b.parameters(), lr=1e-2, weight_decay=0.1, rounding="nearest", states="fp32")
    for i in range(5):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(i))
        for m, o in ((a, oa), (b, ob)):
            m(x).pow(2).sum().backward()
            o.step()
            o.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def _tiny_unet():
    from cascade.offline.tiny import build_stage1_unet

    torch.manual_seed(0)
    return build_stage1_unet()


def _unet_step(unet, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 32, 32, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    enc = torch.randn(2, 8, 32, generator=g)
    return unet(x, t, encoder_hidden_states=enc).sample.pow(2).mean()


def test_optimizer_in_backward_gives_the_same_weights():
    cfg = Train(fused_optimizer=False)
    normal, inback = _tiny_unet(), _tiny_unet()
    opt_n, _ = factory.build(normal.parameters(), cfg)
    cfg.optimizer_in_backward = True
    opt_b, name = factory.build(inback.parameters(), cfg)
    assert name.endswith("+in-backward")
    for step in range(3):
        _unet_step(normal, step).backward()
        opt_n.step()
        opt_n.zero_grad()
        _unet_step(inback, step).backward()
        assert all(p.grad is None for p in inback.parameters())  # gradients were consumed in backward
        opt_b.step()
    assert opt_b.steps_in_backward == 3 * sum(1 for _ in inback.parameters())
    for (n, pn), (_, pb) in zip(normal.named_parameters(), inback.named_parameters()):
        torch.testing.assert_close(pn, pb, rtol=1e-5, atol=1e-6, msg=n)
    sd = opt_b.state_dict()  # accelerate's save_state round-trips it
    opt_b.load_state_dict(sd)


def test_optimizer_in_backward_refused_under_ddp():
    from stages.errors import InputError

    cfg = Train(optimizer_in_backward=True)
    with pytest.raises(InputError, match="single process"):
        factory.build(_tiny_unet().parameters(), cfg, num_processes=2)


def _activation_peak(mode) -> int:
    from torch.distributed._tools.mem_tracker import MemTracker

    unet = _tiny_unet()
    activation_ckpt.apply(unet, mode)
    tracker = MemTracker()
    tracker.track_external(unet)
    with tracker:
        _unet_step(unet, 0).backward()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def test_full_checkpointing_same_gradients_and_less_memory():
    ref, full = _tiny_unet(), _tiny_unet()
    n = activation_ckpt.enable_full_checkpointing(full)
    assert n > 0
    _unet_step(ref, 0).backward()
    _unet_step(full, 0).backward()
    for (name, a), (_, b) in zip(ref.named_parameters(), full.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    peaks = {m: _activation_peak(m) for m in ("none", "resnets", "full")}
    assert peaks["full"] < peaks["resnets"] < peaks["none"], peaks


def test_export_as_fp16_variant_loads_with_variant(tmp_path):
    from diffusers import UNet2DConditionModel

    unet = _tiny_unet()
    unet.save_pretrained(tmp_path / "unet", max_shard_size="200KB")  # sharded, like a real XL export
    convert_to_variant(tmp_path / "unet", "fp16", max_shard_size="200KB")
    assert not list((tmp_path / "unet").glob("diffusion_pytorch_model-*.safetensors"))
    loaded = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet", variant="fp16", dtype=torch.float16)
    for (name, a), (_, b) in zip(unet.named_parameters(), loaded.named_parameters()):
        assert b.dtype == torch.float16
        torch.testing.assert_close(a.half(), b, rtol=0, atol=0, msg=name)


def test_low_precision_adamw_8bit_state_dict_round_trip(tmp_path):
    """Checkpoints hold plain tensors (weights_only loading) and resuming continues identically."""
    torch.manual_seed(0)
    a = torch.nn.Linear(64, 64).to(torch.bfloat16)
    b = torch.nn.Linear(64, 64).to(torch.bfloat16)
    b.load_state_dict(a.state_dict())
    oa = LowPrecisionAdamW(a.parameters(), lr=1e-2, rounding="kahan", states="8bit")
    ob = LowPrecisionAdamW(b.parameters(), lr=1e-2, rounding="kahan", states="8bit")

    def step(m, o, i):
        x = torch.randn(4, 64, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)
        m(x).float().pow(2).sum().backward()
        o.step()
        o.zero_grad()

    for i in range(2):
        step(a, oa, i)
        step(b, ob, i)
    torch.save(ob.state_dict(), tmp_path / "opt.pt")
    ob2 = LowPrecisionAdamW(b.parameters(), lr=1e-2, rounding="kahan", states="8bit")
    ob2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for i in range(2, 4):
        step(a, oa, i)
        step(b, ob2, i)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


@pytest.mark.parametrize("states", ["fp32", "bf16", "8bit"])
@pytest.mark.parametrize("rounding", ["nearest", "kahan", "stochastic"])
def test_chunked_update_equals_the_whole_tensor_update(states, rounding):
    """The update runs in flat chunks (its fp32 scratch is one chunk, not one tensor); 8-bit blocks are
    quantised independently, so chunks on block boundaries give bit-identical weights and states."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(3 * 1024 + 77, 5, generator=g).to(torch.bfloat16)  # not a multiple of the chunk
    grads = [torch.randn(w0.shape, generator=g).to(torch.bfloat16) for _ in range(4)]
    results = []
    for chunk in (1 << 22, 1024):  # whole tensor in one chunk, then 16 chunks
        w = torch.nn.Parameter(w0.clone())
        opt = LowPrecisionAdamW([w], lr=1e-2, weight_decay=0.1, rounding=rounding, states=states, chunk=chunk)
        for gr in grads:
            w.grad = gr.clone()
            opt.step()
        st = opt.state[w]
        m = st["m"].get() if states == "8bit" else st["m"]
        results.append((w.detach().clone(), m.float().reshape(-1).clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert not torch.equal(results[0][0], w0)  # it did update


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stochastic_rounding_unbiased_under_zero_mean_sub_ulp_updates(dtype):
    """1000 zero-mean +-0.1-ulp updates leave the mean weight where it started (round-to-nearest as the
    starting point of fp16's rounding drifted +50 ulp)."""
    import math

    w = torch.full((4000,), 0.3).to(dtype)
    w0 = w.float().clone()
    ulp = (torch.nextafter(w, torch.full_like(w, math.inf)) - w).float()
    g, signs = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    for _ in range(1000):
        s = torch.randint(0, 2, w.shape, generator=signs).float() * 2 - 1
        w = stochastic_round(w.float() + 0.1 * ulp * s, dtype, g)
    drift = ((w.float() - w0) / ulp).mean().item()
    assert abs(drift) < 1.0, drift  # one element wanders ~10 ulp; the mean of 4000 ~0.2 ulp


def test_stochastic_rounding_fp16_exact_and_in_between_values():
    x = torch.tensor([0.5, 0.5 + 2 ** -12, -(0.5 + 2 ** -12)]).repeat(100_000)  # exact, a half-ulp above
    r = stochastic_round(x, torch.float16, torch.Generator().manual_seed(0)).float()
    assert torch.equal(r[0::3], x[0::3])  # representable values never move
    assert set(r[1::3].unique().tolist()) == {0.5, 0.5 + 2 ** -11}
    assert abs(r[1::3].mean().item() - x[1].item()) < 2e-6
    assert abs(r[2::3].mean().item() - x[2].item()) < 2e-6


def test_bf16_optimizer_states_second_moment_decays_like_torch():
    """v moves by 1e-3 of itself a step, under bf16's half-ulp: stored with round-to-nearest it froze
    (0.67 instead of torch's 0.094 after a 10x gradient drop)."""
    w_ref = torch.nn.Parameter(torch.zeros(2048))
    w_bf = torch.nn.Parameter(torch.zeros(2048))
    ref = torch.optim.AdamW([w_ref], lr=1e-6, weight_decay=0.0, foreach=False)
    ours = LowPrecisionAdamW([w_bf], lr=1e-6, weight_decay=0.0, rounding="nearest", states="bf16", seed=0)
    g = torch.Generator().manual_seed(0)
    for step in range(2500):
        grad = torch.randn(2048, generator=g) * (1.0 if step < 300 else 0.1)
        for w, o in ((w_ref, ref), (w_bf, ours)):
            w.grad = grad.clone()
            o.step()
    v_ref = ref.state[w_ref]["exp_avg_sq"].mean().item()
    v_ours = ours.state[w_bf]["v"].float().mean().item()
    assert abs(v_ours - v_ref) / v_ref < 0.03, (v_ours, v_ref)
    assert ((w_bf - w_ref).norm() / w_ref.norm()).item() < 0.05  # and so do the weights


def _in_backward_pair(cfg):
    """Two bf16 parameters with equal values and gradients, each stepped by its own in-backward optimizer."""
    a = torch.nn.Parameter(torch.full((20_000,), 0.3, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.full((20_000,), 0.3, dtype=torch.bfloat16))
    opt, _ = factory.build([a, b], cfg, seed=7)
    grad = torch.rand(20_000, generator=torch.Generator().manual_seed(0)) + 0.5  # Adam's first step: -lr everywhere
    ((a.float() * grad).sum() + (b.float() * grad).sum()).backward()
    return a.detach().float(), b.detach().float()


def test_in_backward_parameters_round_with_distinct_streams():
    cfg = Train(optimizer_in_backward=True, weights_dtype="bfloat16", bf16_update="stochastic", learning_rate=5e-4,
                fused_optimizer=False)
    a, b = _in_backward_pair(cfg)
    ra, rb = a - a.mean(), b - b.mean()  # the rounding decisions: the update is the same (1/4 ulp) everywhere
    corr = (ra * rb).sum() / (ra.norm() * rb.norm())
    assert (a != b).float().mean() > 0.2 and corr.abs() < 0.1, corr  # same seed everywhere: corr 1.000
    assert len({factory.parameter_seed(7, i) for i in range(1000)}) == 1000


def test_rounding_generator_in_the_state_dict_resumes_bit_identically(tmp_path):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(5000, generator=g).to(torch.bfloat16)
    grads = [torch.randn(5000, generator=g) for _ in range(4)]

    def run(opt, w, gs):
        for gr in gs:
            w.grad = gr.to(torch.bfloat16)
            opt.step()

    whole = torch.nn.Parameter(w0.clone())
    opt = LowPrecisionAdamW([whole], lr=1e-3, rounding="stochastic", states="bf16", seed=3)
    run(opt, whole, grads)
    killed = torch.nn.Parameter(w0.clone())
    first = LowPrecisionAdamW([killed], lr=1e-3, rounding="stochastic", states="bf16", seed=3)
    run(first, killed, grads[:2])
    torch.save(first.state_dict(), tmp_path / "opt.pt")
    resumed = LowPrecisionAdamW([killed], lr=1e-3, rounding="stochastic", states="bf16", seed=3)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    run(resumed, killed, grads[2:])
    assert torch.equal(whole, killed)
    assert torch.equal(opt.state[whole]["v"], resumed.state[killed]["v"])


def test_kahan_compensation_is_fp32():
    w = torch.nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))
    opt = LowPrecisionAdamW([w], lr=1e-5, rounding="kahan", states="fp32")
    for _ in range(50):  # 1e-5 a step: 1/780 of bf16's ulp at 1.0, 5e-4 in all
        w.grad = torch.ones_like(w)
        opt.step()
    comp = opt.state[w]["comp"]
    assert comp.dtype == torch.float32
    torch.testing.assert_close((w.float() + comp).mean(), torch.tensor(1 - 50 * 1e-5), rtol=0, atol=3e-6)
