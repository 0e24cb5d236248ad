"""Loading shared by the BLIP model wrappers: device and dtype choice, local-or-hub resolution with
fast offline detection, checkpoint identity, and on-device normalisation of uint8 pixels.

Imports nothing from imgq but :mod:`imgq.errors` and :mod:`imgq.hub`, so the GPU bench can load it without the
producer-side dependencies (pydantic, sqlalchemy).

When the hub is unreachable each file lookup is retried with back-off (about 23 s per file here,
over 200 s for the processor), so an unreachable hub is detected first and only the cache is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from transformers import BlipProcessor, PreTrainedModel
from transformers.utils import logging as hf_logging

from imgq.errors import ConfigError, ModelUnavailable
from imgq.hub import hub_reachable, offline_by_env

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
T = TypeVar("T")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Files beside config.json that change what a checkpoint outputs: generation defaults (a
# repetition penalty, the special tokens), the tokenizer, the image preprocessing. Hashed when
# present; a README or .gitattributes is not.
_OUTPUT_FILES = ("generation_config.json", "preprocessor_config.json", "processor_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
                 "sentencepiece.bpe.model", "spiece.model")


def local_revision(directory: Path, cache: Path | None = None) -> str:
    """Identity of a local checkpoint: its config, the other files that shape its output
    (``_OUTPUT_FILES``), and the contents of its weight files. Sizes alone would give a re-export
    of the same architecture (new weights, same shapes) the old revision, so its results would mix
    with the old ones under one identity. Hashing ~1 GB of BLIP-base weights takes 1.5 s here, so
    each weight file's digest is kept in ``cache`` (:func:`digest_cache`), keyed by what any
    rewrite changes (inode, size, mtime and ctime)."""
    cache = digest_cache() if cache is None else cache
    known = _read_cache(cache)
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    for name in _OUTPUT_FILES:
        if (directory / name).is_file():
            digest.update(f"\0{name}\0{hashlib.sha256((directory / name).read_bytes()).hexdigest()}".encode())
    fresh = False
    for path in sorted(directory.iterdir()):
        if path.name.endswith(_WEIGHT_SUFFIXES):
            stat = path.stat()
            key = f"{path.resolve()}|{stat.st_dev}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"
            content = known.get(key)
            if content is None:
                with path.open("rb") as weights:
                    content = known[key] = hashlib.file_digest(weights, "sha256").hexdigest()
                fresh = True
            digest.update(f"\0{path.name}\0{content}".encode())
    if fresh:
        _write_cache(cache, known)
    return "local-" + digest.hexdigest()[:12]


def digest_cache() -> Path:
    """Where weight digests are kept: ``$XDG_CACHE_HOME/imgq`` (``~/.cache/imgq``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imgq" / "weight-digests.json"


def _read_cache(cache: Path) -> dict[str, str]:
    try:
        found = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def _write_cache(cache: Path, known: dict[str, str]) -> None:
    # Best effort: a read-only home (a container's) only means hashing again next time. Written
    # whole to a temporary file and renamed, so a reader never sees half of it.
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(f".{cache.name}.{os.getpid()}")
        partial.write_text(json.dumps(dict(list(known.items())[-1000:])))
        partial.replace(cache)
    except OSError as exc:
        logger.debug("weight digests not cached (%s)", exc)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if device.startswith("cuda"):
        # Checked lazily: is_bf16_supported() initialises CUDA, which must wait until after fork.
        return torch.bfloat16
    return torch.float32


def quiet_bars_off_a_terminal() -> None:
    """transformers draws its bars (loading, writing and downloading weights) into log files too,
    where each is a line of carriage returns in the middle of the JSON lines; on a terminal they stay."""
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()


def prepare_torch(kind: str, name: str, threads: int, device: str, dtype_arg: str, dtype: torch.dtype) -> torch.dtype:
    """Before a model loads: torch's threads, a CUDA check, quiet bars, and the dtype to load in."""
    quiet_bars_off_a_terminal()
    if threads > 0:
        # Process-wide, and set here because the model loads in the worker process itself.
        # Fewer intra-op threads than cores also stops idle OpenMP threads spinning on the
        # cores that the decode threads need.
        torch.set_num_threads(threads)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelUnavailable(
                f"cannot load {kind} {name!r}: device {device!r} requested but CUDA is not available")
        if dtype_arg == "auto" and not torch.cuda.is_bf16_supported():
            return torch.float16
    return dtype


def local_dir(name: str, kind: str, hint: str) -> Path | None:
    """The checkpoint directory if ``name`` names one (None: a hub id); raises ModelUnavailable,
    in one line that ends with ``hint``, if it names a path that is unusable."""
    path = Path(name).expanduser()
    if not path.exists() and _HUB_ID.match(name):
        return None  # a hub id such as "Salesforce/blip-image-captioning-base"
    if not path.is_dir():
        raise ModelUnavailable(
            f"cannot load {kind} {name!r}: local directory {str(path.absolute())!r} does not exist. {hint}"
        )
    if not (path / "config.json").is_file():
        raise ModelUnavailable(
            f"cannot load {kind} {name!r}: {str(path.absolute())!r} is not a model checkpoint (no config.json). {hint}"
        )
    return path.resolve()


def load_checkpoint(name: str, kind: str, hint: str, requested_revision: str | None,
                    load: Callable[..., T]) -> tuple[T, str]:
    """``load(source, local_files_only=..., revision=...)`` from a local directory, or from the hub
    (its cache only when offline), and the checkpoint's revision. A hub revision is resolved to its
    commit first and loaded at that commit, so the revision recorded is the snapshot loaded even if
    the branch moves meanwhile. Every failure is one ModelUnavailable line that
    says why and ends with ``hint``, the setting to change."""
    local = local_dir(name, kind, hint)
    if local is not None:
        try:
            loaded = load(str(local), local_files_only=True, revision=None)
        except Exception as exc:
            raise ModelUnavailable(
                f"cannot load {kind} {name!r} from {str(local)!r}: {first_line(exc)}. {hint}") from None
        return loaded, local_revision(local)
    offline = offline_by_env() or not hub_reachable()
    commit = hub_commit(name, requested_revision, offline)
    try:
        loaded = load(name, local_files_only=offline, revision=commit or requested_revision)
    except Exception as exc:
        if offline:
            raise ModelUnavailable(
                f"cannot load {kind} {name!r}: not in the local cache and the model hub is unreachable "
                f"(offline). {hint}"
            ) from None
        raise ModelUnavailable(f"cannot load {kind} {name!r} from the model hub: {first_line(exc)}. {hint}") from None
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    return loaded, commit or getattr(model.config, "_commit_hash", None) or requested_revision or "unknown"


def hub_commit(name: str, requested_revision: str | None, offline: bool) -> str | None:
    """The commit a hub checkpoint's revision (None: the default branch) points to, from the hub or,
    offline, from the cache's ``refs/``. transformers up to 5.17 put it on the config as
    ``_commit_hash``; later ones dropped it, and every result of an unpinned hub model was filed
    under revision "unknown" (found by review). None when it cannot be told."""
    try:
        from huggingface_hub import HfApi

        resolved = HfApi().resolve_revision(name, revision=requested_revision, local_files_only=offline)
    except Exception:  # an older huggingface_hub, or nothing cached: the caller falls back
        return None
    return getattr(resolved, "resolved", None)


class BlipBase:
    """A BLIP checkpoint (hub id or local directory) of one transformers class, loaded on first use.

    Subclasses name the class, what the model is called in messages, the setting that chooses it,
    and the weights a usable checkpoint must carry (transformers initialises missing ones at random
    with only a warning, so loading a captioning checkpoint as a retrieval model would "work")."""

    model_class: ClassVar[type[PreTrainedModel]]
    kind: ClassVar[str]  # "caption model": used in log lines and errors
    hint: ClassVar[str]  # the last sentence of a ModelUnavailable: which setting to change
    required_weights: ClassVar[tuple[str, ...]] = ()  # parameter-name prefixes

    def __init__(
        self,
        name_or_path: str,
        *,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        threads: int = 0,
    ) -> None:
        self.name = name_or_path
        self._threads = threads
        self._requested_revision = revision
        self._device_arg = device
        self._dtype_arg = dtype
        self._lock = threading.Lock()
        self._model: Any = None
        self._processor: BlipProcessor | None = None
        self._revision: str | None = None
        self._norm: tuple[torch.Tensor, torch.Tensor] | None = None
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)

    # -- loading -------------------------------------------------------------------------------

    def load(self) -> None:
        """Load model and processor once; safe to call from many threads."""
        if self._model is not None:
            return
        with self._lock:
            if self._model is None:
                self._load_locked()

    def _load_locked(self) -> None:
        self.dtype = prepare_torch(self.kind, self.name, self._threads, self.device, self._dtype_arg, self.dtype)
        (model, processor), self._revision = load_checkpoint(
            self.name, self.kind, self.hint, self._requested_revision, self._from_pretrained)
        model.to(self.device)
        model.eval()
        self._processor = processor
        self._on_loaded(model)
        self._model = model  # last: a non-None model means fully loaded to other threads
        logger.info(
            f"{self.kind} loaded",
            extra={
                "action": "model_loaded",
                "model": self.name,
                "revision": self._revision,
                "device": self.device,
                "dtype": str(self.dtype),
            },
        )

    def _on_loaded(self, model: Any) -> None:
        """Hook for subclasses: derive what they need from the loaded model and processor."""

    def _from_pretrained(self, source: str, *, local_files_only: bool,
                         revision: str | None) -> tuple[Any, BlipProcessor]:
        kwargs: dict[str, Any] = {"revision": revision, "local_files_only": local_files_only}
        model_kwargs: dict[str, Any] = {"dtype": self.dtype}
        if self.model_class._supports_sdpa:
            model_kwargs["attn_implementation"] = "sdpa"
        model, info = self.model_class.from_pretrained(source, **kwargs, **model_kwargs, output_loading_info=True)
        missing = sorted(
            {p for p in self.required_weights for key in info.get("missing_keys", ()) if key.startswith(p)}
        )
        if missing:
            raise ValueError(
                f"the checkpoint has no weights for {', '.join(missing)}; it is not a "
                f"{self.model_class.__name__} checkpoint"
            )
        processor = BlipProcessor.from_pretrained(source, **kwargs)
        return model, processor

    # -- properties that need the loaded model ---------------------------------------------------

    @property
    def revision(self) -> str:
        """The hub commit hash, or ``local-<sha>`` of a local checkpoint's config and weights."""
        self.load()
        assert self._revision is not None
        return self._revision

    @property
    def image_processor(self) -> Any:
        """The transformers image processor (size, mean and std for a fast preprocessor)."""
        self.load()
        assert self._processor is not None
        return self._processor.image_processor

    @property
    def tokenizer(self) -> Any:
        self.load()
        assert self._processor is not None
        return self._processor.tokenizer

    # -- input ------------------------------------------------------------------------------------

    def model_input(self, pixel_values: np.ndarray) -> torch.Tensor:
        """The batch on the model's device and dtype. uint8 pixels (B, 3, H, W) are rescaled and
        normalised there, in float32, with the processor's constants; float32 input is taken as
        already normalised."""
        self.load()
        if pixel_values.dtype == np.uint8:
            pixels = torch.from_numpy(np.ascontiguousarray(pixel_values))
        else:
            pixels = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32))
        if self.device.startswith("cuda"):
            # Pinned host memory lets the copy overlap; the casts then run on the GPU.
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        if pixels.dtype == torch.uint8:
            # x * (scale / std) + (-mean / std), in place: one float32 buffer and two passes over it,
            # 3x less CPU than the textbook (x * scale - mean) / std; within 5e-7 of it.
            gain, offset = self._normalizer()
            pixels = pixels.to(torch.float32).mul_(gain).add_(offset)
        return pixels.to(self.dtype)

    def _normalizer(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._norm is None:
            p = self.image_processor
            shape = (1, 3, 1, 1)
            mean = torch.tensor(p.image_mean, dtype=torch.float64).reshape(shape)
            std = torch.tensor(p.image_std, dtype=torch.float64).reshape(shape)
            gain = float(p.rescale_factor) / std
            self._norm = (
                gain.to(torch.float32).to(self.device),
                (-mean / std).to(torch.float32).to(self.device),
            )
        return self._norm

    @staticmethod
    def check_pixels(pixel_values: np.ndarray) -> None:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")
