"""Checkpoint files on the Hugging Face Hub, named by huggingface_hub's hf:// URIs:

    hf://<owner>/<repo>/<path/to/file>              the file on the main branch
    hf://<owner>/<repo>@<revision>/<path/to/file>   on a branch, tag, commit or refs/pr/<n>
    hf://<owner>/<repo>[@<revision>]                 the whole repository: a diffusers pipeline
                                                     folder (python -m loader export)

    python sample.py --ckpt hf://<owner>/<repo>/<file>.pt ...
    loader.load_model("hf://<owner>/<repo>@<revision>/<file>.pt")

(huggingface_hub's grammar, hf://[<type>/]<id>[@<revision>]/<path>, also names files of dataset
repositories: hf://datasets/<owner>/<repo>/...). Files are fetched with hf_hub_download, whole
repositories with snapshot_download, into the Hugging Face cache (HF_HUB_CACHE, else
$HF_HOME/hub, else ~/.cache/huggingface/hub), which diffusers and transformers share; an
interrupted download resumes; with HF_HUB_OFFLINE=1 they are read from that cache without any
network access.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, parse_hf_uri, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfUriError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


def local_checkpoint(name: str | os.PathLike) -> Path:
    """The local path of a checkpoint name: an hf:// name is fetched into (or found in) the
    Hugging Face cache, a file or, named without a path, the repository's snapshot folder; any
    other name is a local path, returned as is."""
    name = str(name)
    if not name.startswith(constants.HF_PROTOCOL):
        return Path(name)
    try:
        uri = parse_hf_uri(name)
    except HfUriError as err:
        raise ValueError(f"{name}: {err}") from err
    if uri.is_bucket or uri.type != "model" and not uri.path_in_repo:
        raise ValueError(f"{name} does not name a file in a Hub repository nor a model "
                         "repository: hf://<owner>/<repo>[@<revision>][/<path/to/file>]")
    try:
        if not uri.path_in_repo:
            return Path(snapshot_download(uri.id, revision=uri.revision))
        return Path(hf_hub_download(uri.id, uri.path_in_repo, repo_type=uri.type,
                                    revision=uri.revision))
    except LocalEntryNotFoundError as err:  # offline, or the Hub unreachable, and not cached
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise FileNotFoundError(
            f"{name} is not in the Hugging Face cache {constants.HF_HUB_CACHE} and {why}. Fetch "
            f"it where there is internet (`python download.py checkpoint {name}`, or this same "
            "command) and copy that cache here, or point HF_HUB_CACHE / HF_HOME to a cache that "
            "holds it") from err
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as err:
        raise FileNotFoundError(f"{name} cannot be fetched from the Hugging Face Hub: "
                                f"{str(err).splitlines()[0]}") from err
