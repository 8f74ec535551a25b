"""Pretrained weights and the Hugging Face Hub, decided before timm is imported.

huggingface_hub reads HF_HUB_OFFLINE once, when it is imported (timm imports it). Online, timm
downloads pretrained weights from the Hub; offline without that variable, the first download
retries for ~47 s before it fails. So the scripts call `prepare_hub` first: when no weights are
needed, or the Hub cannot be reached, the Hub is switched to offline mode, and weights already in
the local cache (HF_HOME, e.g. baked into the image or mounted) still load in a fraction of a
second, while missing ones fail at once with `pretrained_error`'s one line.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import MutableMapping

import utils

log = logging.getLogger(f"trainer.{__name__}")

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 4.0
_TRUE = {"1", "true", "yes", "on"}


def prepare_hub(need_weights: bool, environ: MutableMapping[str, str] | None = None,
                ) -> str | None:
    """Set HF_HUB_OFFLINE when downloads are pointless or impossible; say why (None: online)."""
    environ = os.environ if environ is None else environ
    if "huggingface_hub" in sys.modules:
        log.debug("huggingface_hub already imported: HF_HUB_OFFLINE can no longer change")
    if (utils.outside_env("HF_HUB_OFFLINE", environ) or "").strip().lower() in _TRUE:
        return "HF_HUB_OFFLINE is set"
    if not need_weights:
        environ["HF_HUB_OFFLINE"] = "1"
        return "no pretrained weights are needed"
    endpoint = utils.outside_env("HF_ENDPOINT", environ) or DEFAULT_ENDPOINT
    problem = probe(endpoint)
    if problem is None:
        return None
    environ["HF_HUB_OFFLINE"] = "1"
    log.warning("%s is unreachable (%s): pretrained weights only from the local cache",
                utils.redact_url(endpoint), problem)
    return f"{utils.redact_url(endpoint)} is unreachable"


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the endpoint answers HTTP at all (proxies honoured), else what went wrong.

    Runs in a thread so a resolver that never answers costs `timeout` seconds, not minutes.
    """
    import requests

    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            requests.head(endpoint, timeout=timeout, allow_redirects=False)
            outcome.append(None)
        except requests.RequestException as exc:
            outcome.append(type(exc).__name__)

    thread = threading.Thread(target=attempt, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return outcome[0] if outcome else "no answer"


def pretrained_error(model_name: str, exc: BaseException, offline: str | None,
                     ) -> utils.ConfigError:
    """The one line a failed pretrained-weights load becomes."""
    home = utils.outside_env("HF_HOME") or "~/.cache/huggingface"
    if offline:
        return utils.ConfigError(
            f"PRETRAINED=true but the pretrained weights of {model_name} are not in the local "
            f"cache ({home}) and {offline}: set PRETRAINED=false, or provide the weights in "
            "HF_HOME")
    return utils.ConfigError(f"PRETRAINED=true but the pretrained weights of {model_name} "
                             f"could not be loaded ({type(exc).__name__}: "
                             f"{utils.one_line(str(exc), 200)})")
