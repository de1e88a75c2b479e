"""Finding and loading scorer weights: hub id or local path, offline errors that say what to do."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def weights_missing(
    what: str, source: str, setting: str, scorer: str, err: Exception | None = None
) -> FileNotFoundError:
    """The one error for weights that cannot be found or downloaded (offline, not cached, wrong path)."""
    reason = (
        f" ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})" if err is not None else ""
    )
    return FileNotFoundError(
        f"cannot load the {what} for scorer {scorer!r} from {source!r}{reason}. It is not a local path and "
        "could not be downloaded (no network, or not in the Hugging Face cache). Download it where the hub "
        "is reachable (huggingface-cli download ...), or pass a local copy: "
        f"make_scorer('{scorer}:{setting}=PATH') or `diffalign score --scorer {scorer}:{setting}=PATH`."
    )


def resolve_file(source: str, filename: str, *, what: str, setting: str, scorer: str) -> Path:
    """A local file from ``source``: a file path, a folder holding ``filename``, a URL, or a hub repo id."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / filename).is_file():
            return path / filename
        raise FileNotFoundError(f"{what} for scorer {scorer!r}: folder {path} has no {filename}")
    if source.startswith(("http://", "https://")):
        try:
            cache = Path(torch.hub.get_dir()) / "diffalign"
            cache.mkdir(parents=True, exist_ok=True)
            target = cache / Path(source).name.replace("%2B", "+")
            if not target.exists():
                torch.hub.download_url_to_file(source, str(target))
            return target
        except Exception as err:  # noqa: BLE001  (any network failure means the same thing here)
            raise weights_missing(what, source, setting, scorer, err) from None
    if source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{what} for scorer {scorer!r}: local path {source} does not exist")
    if source.count("/") != 1:
        raise FileNotFoundError(
            f"{what} for scorer {scorer!r}: {source!r} is neither a local file/folder nor a hub repo id"
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=source, filename=filename))
    except Exception as err:  # noqa: BLE001  (offline, not cached, gated, missing: one clear message)
        raise weights_missing(what, f"{source}/{filename}", setting, scorer, err) from None


def from_pretrained(cls, source: str, *, what: str, setting: str, scorer: str, **kwargs):
    """``cls.from_pretrained(source)`` with the offline error turned into :func:`weights_missing`."""
    path = Path(source).expanduser()
    if path.is_dir():
        return cls.from_pretrained(str(path), **kwargs)
    if path.exists():
        raise FileNotFoundError(
            f"{what} for scorer {scorer!r}: expected a model folder (config.json + weights), got the file "
            f"{path}"
        )
    if source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{what} for scorer {scorer!r}: local folder {source} does not exist")
    try:
        return cls.from_pretrained(source, **kwargs)
    except OSError as err:
        raise weights_missing(what, source, setting, scorer, err) from None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A third-party ``.pt``/``.pth`` state dict, loaded with ``weights_only=True`` (no pickled code runs)."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(
            f"{path}: expected a state dict (optionally under 'state_dict'), got {type(state).__name__}"
        )
    return state


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TruncationWarning:
    """Say once per scorer that prompts longer than the text encoder's limit were truncated."""

    def __init__(self, scorer: str, limit: int):
        self.scorer, self.limit, self.said = scorer, limit, False

    def check(self, lengths: list[int], prompts: list[str]) -> None:
        too_long = [p for p, n in zip(prompts, lengths, strict=True) if n > self.limit]
        if too_long and not self.said:
            self.said = True
            log.warning(
                "scorer %s: %d prompt(s) longer than the text encoder's %d tokens were truncated (e.g. %r); "
                "this is said once per scorer",
                self.scorer, len(too_long), self.limit, too_long[0][:80],
            )
