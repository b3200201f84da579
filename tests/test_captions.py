"""Per-image captions (opt-in): sidecar <image>.txt or metadata.jsonl, "[V]" filled in, encoded once
with T5 before any UNet loads, and each image's caption embedding reaches the UNet with that image."""
from __future__ import annotations

import json

import pytest
import torch

from cascade.captions import CaptionError, read_captions
from cascade.cli.main import main
from stages import components, task as task_module, trainer

CAPTIONS = ["a [V] dog on grass", "a [V] dog in the snow", "a close photo of a [V] dog"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def subject(tmp_path, write_subject):
    return write_subject(tmp_path / "subject", 3, 80)  # 00.png, 01.png, 02.png


def _sidecars(folder, captions):
    for i, c in enumerate(captions):
        (folder / f"{i:02d}.txt").write_text(c + "\n")


def test_sidecar_and_metadata_captions(subject):
    assert read_captions(subject, "none", "jaw") is None  # DreamBooth default: one prompt
    _sidecars(subject, CAPTIONS)
    (subject / "01.txt").write_text("a [V] dog\nin the   snow\n")  # line breaks and runs of spaces -> one space
    assert read_captions(subject, "sidecar", "jaw") == ["a jaw dog on grass", "a jaw dog in the snow",
                                                        "a close photo of a jaw dog"]
    rows = [{"file_name": f"{i:02d}.png", "text": c} for i, c in reversed(list(enumerate(CAPTIONS)))]
    (subject / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_captions(subject, "metadata", "qux") == [c.replace("[V]", "qux") for c in CAPTIONS]


@pytest.mark.parametrize("mode,setup,message", [
    ("sidecar", lambda f: (f / "02.txt").unlink(), "02.txt missing for image"),
    ("sidecar", lambda f: (f / "01.txt").write_text("  \n"), "01.txt is empty"),
    ("sidecar", lambda f: (f / "00.txt").write_bytes(b"\xff\xfe\xfa"), "00.txt cannot be read"),
    ("metadata", lambda f: None, "metadata.jsonl not found"),
    ("metadata", lambda f: _meta(f, {"file_name": "99.png", "text": "x"}), "line 4: '99.png' is not an image"),
    ("metadata", lambda f: _meta(f, {"file_name": "01.png", "text": "x"}), "line 4: second caption for 01.png"),
    ("metadata", lambda f: _meta(f, {"file_name": "00.png", "text": ""}, n=0), "line 1: empty caption for 00.png"),
    ("metadata", lambda f: _meta(f, {"file_name": "00.png"}, n=0), 'line 1: expected an object with "file_name"'),
    ("metadata", lambda f: (f / "metadata.jsonl").write_text("{oops\n"), "line 1: not valid JSON"),
    ("metadata", lambda f: _meta(f, n=2), "no caption for 1 image(s): 02.png"),
])
def test_bad_caption_files_named(subject, mode, setup, message):
    _sidecars(subject, CAPTIONS)
    setup(subject)
    with pytest.raises(CaptionError) as e:
        read_captions(subject, mode, "jaw")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(subject) in str(e.value)  # names the file


def _meta(folder, extra=None, n=3):
    rows = [{"file_name": f"{i:02d}.png", "text": CAPTIONS[i]} for i in range(n)] + ([extra] if extra else [])
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_cli_refuses_bad_captions_before_starting(make_cfg, subject, tmp_path, capsys):
    _sidecars(subject, CAPTIONS[:2])
    out = tmp_path / "o"
    code = main(["train", "stage1", "--subject", str(subject), "--class-noun", "dog", "--output", str(out),
                 "--captions", "sidecar", "--set", f"models.cache_dir={make_cfg().models.cache_dir}"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and "02.txt missing" in errors[0]
    assert not out.exists()


def test_each_image_trains_with_its_caption(make_cfg, subject, tmp_path, monkeypatch):
    """A hook on the UNet sees, row for row, the T5 embedding of the drawn image's own caption (and the
    class prompt's on the prior rows); every caption was encoded in the one T5 pass before the UNet loaded."""
    from cascade.text import TextEncoder

    _sidecars(subject, CAPTIONS)
    cfg = make_cfg()
    events, batches, calls = [], [], []

    def hook(module, args, kwargs):
        if module.training:  # training forward passes, not the validation sampler's
            calls.append(kwargs["encoder_hidden_states"].detach().clone())

    real_load = components.load_unet

    def load_unet(*a, **k):
        events.append("unet")
        unet = real_load(*a, **k)
        unet.register_forward_pre_hook(hook, with_kwargs=True)
        return unet

    real_t5 = TextEncoder._run_t5

    def run_t5(self, prompts):
        events.append(("t5", tuple(prompts)))
        return real_t5(self, prompts)

    real_draw = task_module.ImageTask.draw

    def draw(self, n, with_prior, gen):
        batch = real_draw(self, n, with_prior, gen)
        batches.append((self, batch))
        return batch

    monkeypatch.setattr(components, "load_unet", load_unet)
    monkeypatch.setattr(TextEncoder, "_run_t5", run_t5)
    monkeypatch.setattr(task_module.ImageTask, "draw", draw)
    seen = {}
    real_train = trainer.train
    monkeypatch.setattr(trainer, "train", lambda task, *a, **k: seen.setdefault("r", real_train(task, *a, **k)))
    out = tmp_path / "run"
    assert main(["train", "stage1", "--subject", str(subject), "--class-noun", "dog", "--output", str(out),
                 "--captions", "sidecar", "--identifier", "jaw", "--set", f"models.cache_dir={cfg.models.cache_dir}",
                 "--set", f"models.cache_dir={tmp_path / 'fresh-cache'}",  # fresh embedding cache: T5 must run
                 "--set", f"models.stage1={cfg.models.cache_dir}/tiny-v1/stage1",
                 "--set", f"models.stage2={cfg.models.cache_dir}/tiny-v1/stage2",
                 "--set", "stage1.train.max_steps=3", "--set", "stage1.train.batch_size=3",
                 "--set", "stage1.train.num_class_images=2", "--set", "stage1.train.validation_images=0",
                 "--set", "stage1.sample.steps=1"]) == 0

    texts = [c.replace("[V]", "jaw") for c in CAPTIONS]
    t5 = [e for e in events if e != "unet"]
    assert len(t5) == 1 and set(texts) | {"a jaw dog", "a dog", ""} == set(t5[0][1])  # one T5 pass for all
    assert events.index(t5[0]) < events.index("unet")  # ... before any UNet loaded
    enc = TextEncoder(f"{cfg.models.cache_dir}/tiny-v1/stage1", tmp_path / "fresh-cache").encode(texts + ["a dog"])
    assert all(not torch.equal(enc[a], enc[b]) for a in texts for b in texts if a != b)  # captions differ

    train_batches = [b for t, b in batches if t.instance_text is not None]
    assert len(train_batches) == len(calls) == 3
    task = next(t for t, _ in batches if t.instance_text is not None)
    for batch, hidden in zip(train_batches, calls):
        assert hidden.shape == (6, 77, 32)  # 3 instance rows, then 3 prior rows
        for row in range(3):
            # which subject image was drawn into this row (no flips: the pixels match one image exactly)
            img = [i for i in range(3) if torch.equal(batch["x0"][row], task.instance[i])]
            assert len(img) == 1
            assert torch.equal(hidden[row], enc[texts[img[0]]][0])
        for row in range(3, 6):
            assert torch.equal(hidden[row], enc["a dog"][0])
    drawn = {i for b in train_batches for r in range(3) for i in range(3) if torch.equal(b["x0"][r], task.instance[i])}
    assert len(drawn) >= 2  # rows of one step used different captions
    meta = json.loads((out / "export" / "cascade.json").read_text())
    assert meta["captions"] == "sidecar"


def test_stage2_batches_carry_caption_rows(tiny):
    """Stage II draws the same way: each row's embedding is its high-res image's caption's."""
    from stages.stage2 import Stage2Task

    g = torch.Generator().manual_seed(0)
    images, prior = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1, torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    text, class_text = torch.randn(3, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    noising = components.load_scheduler(str(tiny / "stage2"), "image_noising_scheduler")
    task = Stage2Task(images, noising, 0, 5, prior=prior, resolution=64, lowres=16)
    assert "encoder_hidden_states" not in task.batch(4, True, torch.Generator().manual_seed(1))  # default: none
    task.set_captions(text, class_text)
    batch = task.batch(4, True, torch.Generator().manual_seed(1))
    assert batch["encoder_hidden_states"].shape == (8, 77, 32) and batch["lowres"].shape == (8, 3, 16, 16)
    for row in range(4):
        (i,) = [i for i in range(3) if torch.equal(batch["x0"][row], images[i])]
        assert torch.equal(batch["encoder_hidden_states"][row], text[i])
    assert torch.equal(batch["encoder_hidden_states"][4:], class_text.expand(4, -1, -1))
