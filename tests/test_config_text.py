"""Config validation, the tiny tokenizer and T5 path, the embedding cache, the identifier picker."""
from __future__ import annotations

import pytest
import torch

from cascade.config import ConfigError, load_config
from cascade.identifier import IdentifierError, check_identifier, pick_identifier
from cascade.text import TextEncoder, load_tokenizer


def test_presets_load_and_overrides_apply():
    for name in ("tiny", "if-m", "if-l", "if-xl"):
        assert load_config(name).name == name
    cfg = load_config("if-xl", ["stage1.train.learning_rate=3e-6", "stage2.train.lora_rank=8", "models.variant=null"])
    assert cfg.stage1.train.learning_rate == 3e-6 and cfg.stage2.train.lora_rank == 8 and cfg.models.variant is None
    assert cfg.models.stage1 == "DeepFloyd/IF-I-XL-v1.0" and cfg.identifier.min_id == 5000


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1:\n  train:\n    learning_rat: 1e-5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'stage1.train.learning_rat'"):
        load_config(bad)
    bad.write_text("stage1:\n  train:\n    max_steps: many\n")
    with pytest.raises(ConfigError, match="stage1.train.max_steps"):
        load_config(bad)
    with pytest.raises(ConfigError, match="stage2.train.mixed_precision"):
        load_config("tiny", ["stage2.train.mixed_precision=fp8"])
    with pytest.raises(ConfigError, match="noise_aug"):
        load_config("tiny", ["stage2.train.noise_aug_max=1000"])
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        load_config("tiny", ["stage1.train.gradient_checkpointing=3"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_tiny_tokenizer_really_tokenizes(tiny):
    tok = load_tokenizer(str(tiny / "stage1"))
    ids = {w: tok(f"a {w}").input_ids for w in ("dog", "cat", "backpack", "teapot")}
    assert len({tuple(v) for v in ids.values()}) == 4
    assert all(v[-1] == tok.eos_token_id for v in ids.values())
    assert len(tok) > 4000


def test_embeddings_match_ifpipeline_and_cache(tiny, tmp_path, caplog):
    from diffusers import IFPipeline

    enc = TextEncoder(str(tiny / "stage1"), tmp_path)
    prompts = ["a jaw dog", "A Dog On The Beach ", ""]
    out = enc.encode(prompts)
    pipe = IFPipeline.from_pretrained(tiny / "stage1", safety_checker=None, watermarker=None, feature_extractor=None,
                                      requires_safety_checker=False)
    ref, neg = pipe.encode_prompt(prompts[:2], do_classifier_free_guidance=True, device="cpu")
    assert out["a jaw dog"].shape == (1, 77, 32)
    assert torch.allclose(out["a jaw dog"][0], ref[0], atol=1e-6)
    assert torch.allclose(out["A Dog On The Beach "][0], ref[1], atol=1e-6)
    assert torch.allclose(out[""][0], neg[0], atol=1e-6)
    assert enc.calls == 1
    again = TextEncoder(str(tiny / "stage1"), tmp_path).encode(prompts)  # a new process would hit the cache too
    assert all(torch.equal(again[p], out[p]) for p in prompts)
    enc.encode(prompts)
    assert enc.calls == 1
    long_prompt = "a dog " + "with a very long tail " * 30
    with caplog.at_level("WARNING"):
        assert enc.check_lengths(["a dog", long_prompt]) == [long_prompt]
    assert any("truncated" in r.message and "very long tail" in r.message for r in caplog.records)


def test_identifier_picker_is_rare_short_and_deterministic(tiny):
    tok = load_tokenizer(str(tiny / "stage1"))
    picks = [pick_identifier(tok, seed, 3000, 4400, 3) for seed in (0, 0, 1, 2)]
    assert picks[0] == picks[1] and len({p for p in picks}) >= 2
    for text, i in picks:
        assert 3000 <= i < 4400 and 1 <= len(text) <= 3
        assert tok(text, add_special_tokens=False).input_ids == [i]
        assert tok.decode([i]).strip() == text
    with pytest.raises(IdentifierError, match="no token"):
        pick_identifier(tok, 0, 3000, 3010, 1)


def test_identifier_checks():
    assert check_identifier("zir", "dog") == "zir"
    for word, msg in (("dog", "class noun"), ("the", "common word"), ("two words", "single word"), ("", "single")):
        with pytest.raises(IdentifierError, match=msg):
            check_identifier(word, "dog")


def test_identifiers_that_are_a_form_of_the_class_noun(tiny):
    """Issue 27 item 12: "a dogs dog" was accepted. A plural, singular or prefix form (the shorter at
    least 3 letters) of a class word is refused, and the picker never picks one."""
    for word, noun in (("dogs", "dog"), ("Dogs", "dog"), ("dog", "dogs"), ("doggy", "dog"), ("puppies", "puppy"),
                       ("boxes", "box"), ("wolves", "wolf"), ("bears", "teddy bear"), ("tea", "teapot")):
        with pytest.raises(IdentifierError, match="class noun"):
            check_identifier(word, noun)
    for word, noun in (("zir", "dog"), ("jaw", "teddy bear"), ("dg", "dog"), ("og", "dog")):
        assert check_identifier(word, noun) == word
    tok = load_tokenizer(str(tiny / "stage1"))
    token, _ = pick_identifier(tok, 0, 3000, 4400, 3)
    assert pick_identifier(tok, 0, 3000, 4400, 3, avoid=(token + "s",))[0] != token  # a class of its plural
