"""Hub lookups that fail fast: is a name a Hub id, can the Hub be reached, and what to tell the user.

Without `HF_HUB_OFFLINE`, a Hub id on a machine with no network goes through huggingface_hub's
retries (five, about 30 s) before it fails. `hub_or_cache` checks the endpoint once (one TCP connect,
a few seconds at most) and, when it cannot be reached, runs the load in the libraries' own offline
mode: a cached copy still loads, anything else fails at once, and `offline_note` says why and what to
do. Behind a proxy (HTTPS_PROXY / ALL_PROXY set) the check is skipped: the proxy decides.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from urllib.parse import urlsplit

from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
from huggingface_hub import constants
from huggingface_hub.utils import HFValidationError, validate_repo_id

_TRUE = ("1", "true", "yes", "on")
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")
_REACHABILITY: dict[str, str | None] = {}  # endpoint -> why it cannot be reached (None: it can)


def is_hub_lookup(name_or_path: str | None, data_files=None) -> bool:
    """Whether loading `name_or_path` asks the Hugging Face Hub (as opposed to reading local files).

    Local: an existing file or folder, anything that cannot be a repo id (absolute or relative
    paths), and a builder name (parquet, csv, imagefolder...) whose data_files are all local.
    None means "unknown": treated as a hub id.
    """
    if name_or_path is None:
        return True
    if os.path.exists(name_or_path):
        return False
    if name_or_path in _PACKAGED_DATASETS_MODULES:
        return any("://" in f for f in _data_file_strings(data_files))  # hf://, https://, s3://
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return False  # a path that does not exist: "not found" is the whole story
    return True


def _data_file_strings(data_files) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, (str, os.PathLike)):
        return [str(data_files)]
    if isinstance(data_files, dict):
        return [f for value in data_files.values() for f in _data_file_strings(value)]
    return [str(f) for f in data_files]


def offline_switch_on() -> bool:
    """HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set (read at call time)."""
    return any(os.environ.get(name, "").lower() in _TRUE for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub endpoint (HF_ENDPOINT) cannot be reached from here, or None when it can.

    One TCP connect, remembered for the process; None behind a proxy (a direct connect says nothing there).
    """
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    endpoint = constants.ENDPOINT
    if endpoint not in _REACHABILITY:
        url = urlsplit(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            _REACHABILITY[endpoint] = None
        except OSError as exc:
            _REACHABILITY[endpoint] = f"{url.hostname}:{port}: {exc.strerror or exc}"
    return _REACHABILITY[endpoint]


@contextlib.contextmanager
def hub_or_cache(name_or_path: str | None, data_files=None) -> Iterator[None]:
    """Inside the block, a Hub lookup on a machine that cannot reach the Hub reads only the local cache
    (huggingface_hub's and datasets' offline mode) instead of retrying; otherwise nothing changes."""
    if offline_switch_on() or not is_hub_lookup(name_or_path, data_files) or hub_unreachable() is None:
        yield
        return
    datasets_config = sys.modules.get("datasets.config")
    saved = constants.HF_HUB_OFFLINE, getattr(datasets_config, "HF_HUB_OFFLINE", None)
    constants.HF_HUB_OFFLINE = True
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved[0]
        if datasets_config is not None:
            datasets_config.HF_HUB_OFFLINE = saved[1]


def offline_note(name_or_path: str | None = None, data_files=None) -> str:
    """A sentence to append to a load error when the load needed the Hub and the Hub was out of reach
    (the offline switches are on, or the endpoint cannot be reached).

    A missing split of a local folder has nothing to do with being offline, so no note there.
    `name_or_path=None` means "assume a hub id". The switches are read at call time.
    """
    if not is_hub_lookup(name_or_path, data_files):
        return ""
    if offline_switch_on():
        return " The machine is offline (HF_HUB_OFFLINE is set): only local folders and the cache can be used."
    reason = hub_unreachable()
    if reason is None:
        return ""
    return (
        f" The Hub cannot be reached ({reason}), so only local folders and the cache can be used: point the key at a "
        "local copy, or set HF_HUB_OFFLINE=1 to say the machine is offline."
    )
