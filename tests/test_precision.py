"""bf16 weights with compensated updates, optimizer-in-backward, full gradient checkpointing, fp16 exports."""
import pytest
import torch

from cascade.config import Train
from stages import activation_ckpt, optim
from stages.precision import LowPrecisionAdamW, convert_to_variant, stochastic_round

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
    opt_n, _ = optim.build(normal.parameters(), cfg)
    cfg.optimizer_in_backward = True
    opt_b, name = optim.build(inback.parameters(), cfg)
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
        optim.build(_tiny_unet().parameters(), cfg, num_processes=2)


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
