"""Pretrained weights and the Hugging Face Hub, decided before timm is imported.

huggingface_hub reads HF_HUB_OFFLINE once, when it is imported (timm imports it). Online, timm
downloads pretrained weights from the Hub; offline without that variable, the first download
retries for ~47 s before it fails. So the scripts call `prepare_hub` first: when no weights are
needed, or the Hub cannot be reached, the Hub is switched to offline mode, and weights already in
the local cache (HF_HOME, e.g. baked into the image or mounted) still load in a fraction of a
second, while missing ones fail at once with `pretrained_error`'s one line.

The logic is utils' (`prepare_hf_hub`, `hf_pretrained_error`, `probe_endpoint`), shared with the
Hugging Face transformers trainer, which needs the same; these are the names timm's scripts call.
"""

from __future__ import annotations

import utils

prepare_hub = utils.prepare_hf_hub
pretrained_error = utils.hf_pretrained_error
probe = utils.probe_endpoint
