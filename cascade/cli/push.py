"""`cascade push --repo-id ID EXPORT`: upload an export (with its model card) to the Hugging Face hub
through huggingface_hub. Every check runs before anything is sent: the folder is an export, the
repo id is valid, the hub is reachable (offline: one-line refusal) and a token is there."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from stages.errors import InputError

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 5.0


def add_commands(sub):
    p = sub.add_parser("push", help="upload an export (weights, cascade.json, model card) to the Hugging Face hub")
    p.add_argument("export", help="an export folder written by `cascade train` (<run>/export)")
    p.add_argument("--repo-id", required=True, help="the hub repository, e.g. your-name/if-dreambooth-dog")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--message", default=None, help="commit message (default: names the identifier and class)")


def hub_unreachable() -> str | None:
    """None when the hub answers; else why not, in one clause (HF_HUB_OFFLINE, connection error)."""
    from cascade.model_checks import hub_offline

    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    from huggingface_hub import constants, get_session

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    try:
        get_session().head(f"{endpoint}/api/models", timeout=PROBE_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - DNS failure, refused connection, timeout, proxy errors
        return " ".join(f"{e.__class__.__name__}: {e}".split())[:160]
    return None


def check_push(export: Path, repo_id: str):
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from cascade import model_card

    if not model_card.is_export(export):
        raise InputError(f"{export}: not a cascade export (no cascade.json with unet/ or LoRA weights)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise InputError(f"--repo-id {repo_id!r}: {str(e).splitlines()[0]}") from None
    if "/" not in repo_id:
        raise InputError(f"--repo-id {repo_id!r}: expected owner/name")


def cmd_push(args):
    from huggingface_hub import HfApi, get_token

    from cascade import model_card

    export = Path(args.export)
    check_push(export, args.repo_id)
    reason = hub_unreachable()
    if reason:
        raise InputError(f"the Hugging Face hub cannot be reached ({reason}); push from a machine with network")
    if get_token() is None:
        raise InputError("no Hugging Face token: log in (`hf auth login`) or set HF_TOKEN")
    model_card.write_model_card(export, repo=args.repo_id)  # the card names the repo in its loading code
    meta = model_card.read_meta(export)
    api = HfApi()
    api.create_repo(args.repo_id, repo_type="model", private=args.private, exist_ok=True)
    message = args.message or f"cascade export: stage {meta.get('stage')} '{meta.get('instance_prompt', '')}'"
    info = api.upload_folder(folder_path=str(export), repo_id=args.repo_id, repo_type="model", commit_message=message,
                             ignore_patterns=["*.tmp"])
    print(f"pushed {export} to https://huggingface.co/{args.repo_id} ({getattr(info, 'oid', info)})")


COMMANDS = {"push": cmd_push}
