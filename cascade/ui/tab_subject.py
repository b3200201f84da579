"""Subject tab: photos (uploaded or a folder), class noun, preset, identifier; the CLI's checks
shown beside the field at fault."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from cascade.ui import commands, safety
from cascade.ui.runs_view import UI_DIR

FIELDS = ("photos", "class_noun", "preset", "identifier")
LABELS = {"photos": "photos", "class_noun": "class noun", "preset": "preset", "identifier": "identifier"}


@dataclass
class SubjectFields:
    """The Subject tab's components, read by the other tabs' events."""
    folder: object
    class_noun: object
    preset: object
    identifier: object
    msgs: list  # beside photos, class noun, preset, identifier

    def inputs(self) -> list:
        return [self.folder, self.class_noun, self.preset, self.identifier]


def to_subject(folder, class_noun, preset, identifier) -> commands.Subject:
    return commands.Subject((folder or "").strip(), (class_noun or "").strip(), preset or "toy", identifier or "")


def save_uploads(ctx, files) -> tuple[str | None, list[str]]:
    """Uploaded files checked (images only, size limit) and copied into a new folder under the runs
    folder: (folder or None, one message per refused file)."""
    files = [Path(getattr(f, "name", f)) for f in (files or [])]
    refused = [m for f in files if (m := safety.check_upload(f))]
    good = [f for f in files if not safety.check_upload(f)]
    if not good:
        return None, refused or ["no photos uploaded"]
    folder = ctx.new_folder("subject", ctx.runs / UI_DIR / "subjects")
    folder.mkdir(parents=True)
    for i, f in enumerate(good):
        suffix = f.suffix.lower() if f.suffix.lower() in safety.IMAGE_SUFFIXES else ".png"
        shutil.copyfile(f, folder / f"{i:02d}{suffix}")
    return str(folder), refused


def pick_identifier(preset: str, class_noun: str, seed: int) -> str:
    from cascade import models
    from cascade.config import load_config
    from cascade.identifier import pick_identifier as pick
    from cascade.text import load_tokenizer

    cfg = load_config(preset)
    idc = cfg.identifier
    token, _ = pick(load_tokenizer(models.resolve(cfg).text_encoder), seed, idc.min_id, idc.max_id, idc.max_chars,
                    avoid=tuple((class_noun or "").lower().split()))
    return token


def messages(errors: dict[str, str]) -> list[str]:
    return [safety.text(errors[f]) if f in errors else "" for f in FIELDS]


def check_subject(folder, class_noun, preset, identifier) -> list[str]:
    """The check button: the message beside each field at fault, and a verdict naming those fields.
    The tab's only settings are the preset's (its models, its training settings), so an error about
    them is marked beside the preset."""
    errors = commands.check_train(to_subject(folder, class_noun, preset, identifier), commands.TrainSettings(stages=(1,)))
    if "settings" in errors:
        errors.setdefault("preset", errors.pop("settings"))
    marked = [LABELS[f] for f in FIELDS if f in errors]
    verdict = "fix the fields marked above: " + ", ".join(marked) if marked else "the subject passes the stage I checks"
    return [*messages(errors), verdict]


def build(ctx) -> SubjectFields:
    import gradio as gr

    gr.Markdown("Upload 3-5 photos of the subject (or name a folder), its class noun and the preset. "
                "The checks are the `cascade train` command's own, shown beside the field at fault.")
    with gr.Row():
        with gr.Column():
            upload = gr.File(label="photos (images only, up to %d MB each)" % safety.MAX_UPLOAD_MB,
                             file_count="multiple", file_types=["image"], elem_id="subject-upload")
            folder = gr.Textbox(label="subject folder (filled by an upload, or type a path)", elem_id="subject-folder")
            msg_photos = gr.Markdown(elem_id="msg-photos")
            preview = gr.Gallery(label="the photos", columns=5, height=160, elem_id="subject-preview")
        with gr.Column():
            class_noun = gr.Textbox(label="class noun", placeholder="e.g. dog", elem_id="subject-class",
                                    value="toy" if ctx.preset == "toy" else "")
            msg_class = gr.Markdown(elem_id="msg-class")
            preset = gr.Dropdown(list(dict.fromkeys([ctx.preset, *commands.PRESETS])), value=ctx.preset,
                                 label="preset", allow_custom_value=True, elem_id="subject-preset")
            msg_preset = gr.Markdown(elem_id="msg-preset")
            with gr.Row():
                identifier = gr.Textbox(label="identifier (blank: the CLI picks a rare token)",
                                        elem_id="subject-identifier")
                seed = gr.Number(value=0, precision=0, label="pick seed", minimum=0)
                pick_btn = gr.Button("pick a rare token", elem_id="subject-pick")
            msg_ident = gr.Markdown(elem_id="msg-identifier")
            check_btn = gr.Button("check", variant="primary", elem_id="subject-check")
            verdict = gr.Markdown(elem_id="subject-verdict")
    msgs = [msg_photos, msg_class, msg_preset, msg_ident]
    fields = SubjectFields(folder, class_noun, preset, identifier, msgs)

    def on_upload(files):
        where, refused = save_uploads(ctx, files)
        note = safety.text("; ".join(refused)) if refused else ""
        shown = [str(p) for p in sorted(Path(where).iterdir())] if where else []
        return (where or gr.skip()), note, shown

    def on_folder(path):
        p = Path(path or "")
        return [str(f) for f in sorted(p.iterdir()) if f.suffix.lower() in safety.IMAGE_SUFFIXES][:10] \
            if p.is_dir() and safety.inside(p, ctx.runs) else []

    def on_pick(preset_v, noun, s):
        try:
            return pick_identifier(preset_v, noun, int(s or 0)), ""
        except Exception as e:  # the CLI's message for a preset it cannot read
            return gr.skip(), safety.text(f"cascade identifier: error: {e}")

    upload.upload(on_upload, upload, [folder, msg_photos, preview])
    folder.change(on_folder, folder, preview)
    check_btn.click(check_subject, fields.inputs(), [*msgs, verdict])
    pick_btn.click(on_pick, [preset, class_noun, seed], [identifier, msg_ident])
    return fields
