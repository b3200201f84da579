"""report.html for a demo folder: settings, timings, loss curves, validation grids, and the
before/after cascade grids per stage. Every link is relative, so the folder can be moved."""
from __future__ import annotations

import html
from pathlib import Path


def _img(root: Path, rel: str, caption: str, width: int | None = None) -> str:
    if not (root / rel).is_file():
        return ""
    w = f' width="{width}"' if width else ""
    return (f'<figure><a href="{html.escape(rel)}"><img src="{html.escape(rel)}"{w} alt="{html.escape(caption)}">'
            f'</a><figcaption>{html.escape(caption)}</figcaption></figure>')


def _latest(root: Path, folder: str) -> str | None:
    files = sorted((root / folder).glob("step-*.png")) if (root / folder).is_dir() else []
    return str(files[-1].relative_to(root)) if files else None


def _table(rows: list[tuple[str, object]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                               for k, v in rows) + "</table>"


def _pct(x) -> str:
    return f"{100 * x:.0f}%"


def _toy_section(root: Path, s: dict) -> list[str]:
    """The toy world's reader-measured numbers: the paper's three claims on this one run."""
    t = s.get("toy")
    if not t:
        return []
    b, a, sr = t["before"], t["after"], t["sr_heldout_views"]
    n = t["images_per_prompt"]
    rows = [(f"subject fidelity: '{s['prompts'][0]}' samples with the subject's colour+shape (of {n})",
             f"base {_pct(b['subject_fidelity'])} -> fine-tuned {_pct(a['subject_fidelity'])}"),
            (f"drift: '{s['prompts'][1]}' samples that took the subject's colour+shape (of {n})",
             f"base {_pct(b['class_subject_share'])} -> fine-tuned {_pct(a['class_subject_share'])}"),
            ("diversity of '" + s["prompts"][1] + "' samples: entropy of (colour, shape), bits (uniform: 4.58)",
             f"base {b['class_entropy_bits']:.2f} -> fine-tuned {a['class_entropy_bits']:.2f}"),
            ("SR of held-out views of the subject (new poses and glyph places, never trained on): glyph placed / "
             "glyph drawn (1 = as in the truth) / stripes / emblem",
             "; ".join(f"{name}{' (aug ' + '..'.join(map(str, v['noise_aug'])) + ')' if 'noise_aug' in v else ''} "
                       f"{_pct(v['glyph_hit'])} / {v['glyph_drawn']:.2f} / {_pct(v['stripes'])} / {_pct(v['emblem'])}"
                       for name, v in sr.items()))]
    return ["<h2>What the readers measure (toy world)</h2>",
            "<p>This is a <b>toy world</b>: a procedural world of coloured toys and a tiny cascade pretrained on it "
            "(cascade/toy), so the numbers below are measured exactly by attribute readers, on few samples of one run "
            "(see <code>cascade toy study</code> for several seeds). The same demo on real IF weights: "
            "<code>cascade demo --config if-xl --subject DIR --class-noun NOUN</code> (GPU, downloaded weights).</p>",
            _table(rows),
            _img(root, "sr-subject.png", "rows: held-out 16 px views of the subject (nearest), SR base, SR fine-tuned "
                 "at low and at high noise augmentation, the true 64 px views", 512)]


def write_report(root: Path, s: dict) -> Path:
    parts = [f"<h1>cascade demo: DreamBooth on the IF cascade ({html.escape(s['config'])})</h1>",
             f'<p class="{"warn" if s["random_weights"] else "ok"}"><b>Weights:</b> {html.escape(s["weights"])}</p>',
             "<h2>Subject</h2>", f"<p>{html.escape(s['subject_note'])}: identifier <code>{html.escape(s['identifier'])}"
             f"</code>, class <code>{html.escape(s['class_noun'])}</code></p>", _img(root, "subject.png", "subject images"),
             *_toy_section(root, s),
             *([f'<p class="warn">{html.escape(s["readers_note"])}</p>'] if s.get("readers_note") else []),
             "<h2>Settings</h2>",
             _table([("stage I", f"{s['stage1']['steps']} steps, prior weight {s['stage1']['prior_weight']}, "
                                 f"{'LoRA r=' + str(s['stage1']['lora_rank']) if s['stage1']['lora_rank'] else 'full fine-tune'}"),
                     ("stage II", f"{s['stage2']['steps']} steps, noise augmentation {s['stage2']['noise_aug'][0]}.."
                                  f"{s['stage2']['noise_aug'][1]}, sampled at noise_level {s['stage2']['sample_noise_level']}"),
                     ("stage III", s["stage3"]), ("prompts", "; ".join(s["prompts"])),
                     ("images per prompt", s["images_per_prompt"]),
                     ("resolved configs", "stage1/config.yaml, stage2/config.yaml")]),
             "<h2>Timings (seconds)</h2>", _table(list(s["timings_seconds"].items())),
             "<h2>Training</h2>",
             _table([("stage I final instance / prior loss",
                      f"{s['stage1']['final_instance_loss']} / {s['stage1']['final_prior_loss']}"),
                     ("stage II final loss", s["stage2"]["final_instance_loss"])]),
             '<div class="row">', _img(root, "stage1/loss.png", "stage I loss (instance and prior)", 420),
             _img(root, "stage2/loss.png", "stage II loss", 420), "</div>", '<div class="row">',
             _img(root, "stage1/validation.png", "stage I: loss and live measures per validation step", 640),
             _img(root, "stage2/validation.png", "stage II: loss and live measures per validation step", 640),
             "</div>", '<div class="row">']
    for stage in ("stage1", "stage2"):
        rel = _latest(root, f"{stage}/samples")
        if rel:
            parts.append(_img(root, rel, f"{stage} validation samples at the last step", 256))
    layout = s.get("grid_layout", "one row per prompt")
    parts.append(f"</div><h2>Cascade samples: base vs fine-tuned (same prompts and seeds; {html.escape(layout)}: "
                 + html.escape(" | ".join(s["prompts"])) + ")</h2>")
    for stage, label in (("stage1", "stage I"), ("stage2", "stage II"), ("stage3", "stage III")):
        before, after = f"samples-before/grid-{stage}.png", f"samples-after/grid-{stage}.png"
        if (root / before).is_file() or (root / after).is_file():
            parts += [f"<h3>{label}</h3>", '<div class="row">', _img(root, before, "base models", 384),
                      _img(root, after, "fine-tuned", 384), "</div>"]
    parts.append('<p>Records: <a href="summary.json">summary.json</a>, <a href="samples-after/samples.json">'
                 'samples-after/samples.json</a>, <a href="log.txt">log.txt</a></p>')
    style = ("body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}"
             ".row{display:flex;gap:16px;flex-wrap:wrap}figure{margin:0}img{image-rendering:pixelated;"
             "border:1px solid #ddd}.warn{background:#fff3cd;padding:8px}.ok{background:#e7f5e7;padding:8px}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>cascade demo</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
    out = root / "report.html"
    out.write_text(page)
    return out
