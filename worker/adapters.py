"""Per-language LoRA adapters served beside the caption model: loaded on demand, verified against their
registered revision, kept in a small LRU, and mixed freely within one batched ``generate``.

How (checked against peft 0.21 and transformers 5.24):

* The first adapter wraps the loaded ``BlipForConditionalGeneration`` in peft's ``LoraModel`` *in place*
  (``lora.Linear`` replaces each targeted projection, :mod:`imgq.worker.lora`); later ones are injected
  beside it. Until then the caption model is untouched. The tuner's active-adapter list is kept empty,
  so any call without ``adapter_names`` (``CaptionModel.caption``, ``explain``) is the base model, bit
  for bit.
* One batch, many adapters: inside ``LoraModel._enable_peft_forward_hooks(adapter_names=[...])`` every
  LoRA layer adds, per row, the delta of that row's adapter (``"__base__"``: none). With beam search peft
  repeats each name ``num_beams`` times, as BLIP's generate repeats the image features. The fused decoder
  attention (:mod:`imgq.worker.attention`) calls ``self.query(...)`` and friends as modules, so the LoRA
  layers and their hooks run on the SDPA path too (tests compare mixed batches with one adapter at a time).
* Files: an adapter's folder holds peft's ``save_pretrained`` layout (``adapter_config.json`` +
  ``adapter_model.safetensors``). A worker copies it, from S3 or from a folder under IMGQ_LOCAL_ROOTS
  (read beneath the root, no symlinks), into ``IMGQ_ADAPTER_DIR/<name>-<revision>``; the weights are hashed
  and loaded from the same bytes, so what runs is what was verified. The config is hashed too when the
  record pins it (``config_sha256``, migration 0016): ``lora_alpha`` or ``r`` edited in place would change
  captions under the same revision. A record from before 0016 has no config digest and is not checked.

Threads: ``generate`` runs on the worker's one inference thread; loading, eviction and the batched call
hold one lock, so an adapter is never injected or deleted while a batch runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgq import errors
from imgq.contract import CaptionParams
from imgq.db.adapters import AdapterRecord
from imgq.worker.lora import TARGET_MODULES

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
_MAX_CONFIG_BYTES = 1 << 20
_MAX_WEIGHTS_BYTES = 2 << 30


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def matches(digest: str, revision: str) -> bool:
    """A registered revision is the full hex SHA-256 or a prefix of it (at least 16 characters)."""
    return len(revision) >= 16 and digest.startswith(revision.lower())


def config_matches(record: AdapterRecord, config: bytes) -> bool:
    """Whether ``config`` (adapter_config.json's bytes) is the registered one; a record registered before
    migration 0016 pins no config and any passes."""
    return record.config_sha256 is None or matches(sha256_hex(config), record.config_sha256)


def config_refused(record: AdapterRecord, config: bytes) -> errors.AdapterUnavailable:
    digest = sha256_hex(config)
    return errors.AdapterUnavailable(
        f"adapter {record.name!r}: {CONFIG_FILE} has SHA-256 {digest[:16]}..., not its registered "
        f"{str(record.config_sha256)[:16]}... (edited since it was registered?); refused: re-register it, e.g. by "
        "running `imgq finetune` again or registering the new digest")


def lora_config(name: str, config: bytes) -> Any:
    """``adapter_config.json``'s bytes as the peft LoraConfig a worker loads, or AdapterUnavailable
    saying why not (not JSON, not imgq's layout, not a config peft reads). A config that does not
    parse is the adapter's fault, not the worker's: raised as anything else it was retried, failed
    every batch of the adapter, and the strikes stopped the worker. ``imgq adapter register`` checks
    with it too, so what it registers is what a worker loads."""
    from peft import LoraConfig

    try:
        raw = json.loads(config)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise errors.AdapterUnavailable(f"adapter {name!r}: {CONFIG_FILE} is not JSON ({_first_line(exc)})") from None
    if raw.get("peft_type") != "LORA" or raw.get("target_modules") != TARGET_MODULES:
        raise errors.AdapterUnavailable(f"adapter {name!r} is not imgq's LoRA layout (peft_type LORA on the text "
                                        "decoder's attention, imgq.worker.lora); train it with `imgq finetune`")
    try:  # peft reads a folder: the checked bytes go into one, not the file read again
        with tempfile.TemporaryDirectory(prefix="imgq-adapter-config-") as folder:
            (Path(folder) / CONFIG_FILE).write_bytes(config)
            return LoraConfig.from_pretrained(folder)
    except Exception as exc:
        raise errors.AdapterUnavailable(f"adapter {name!r}: {CONFIG_FILE} is not a LoRA config peft reads: "
                                        f"{_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# -- where an adapter's files come from -----------------------------------------------------------------------

class AdapterFiles:
    """``record -> local folder``: the worker's verified copy in ``IMGQ_ADAPTER_DIR/<name>-<revision>`` of an
    adapter stored in S3 (bucket in IMGQ_ALLOWED_BUCKETS) or in a folder under IMGQ_LOCAL_ROOTS. A copy whose
    weights already hash to the revision, and whose config to the record's ``config_sha256`` when it has one,
    is reused; anything else is fetched again into a fresh folder and renamed into place. Fetched files whose
    config does not hash to the record's are refused (AdapterUnavailable) and leave the cache as it was."""

    def __init__(self, settings: Any, s3_client: Any | None = None) -> None:
        self._settings = settings
        self._s3 = s3_client
        self.root = Path(settings.adapter_dir).expanduser().resolve()

    def __call__(self, record: AdapterRecord) -> Path:
        record.check()
        where = self._where(record)  # checked even for a cached copy: the allow-lists may have narrowed
        dest = self.root / f"{record.name}-{record.revision}"
        weights, config = dest / WEIGHTS_FILE, dest / CONFIG_FILE
        if (weights.is_file() and config.is_file() and matches(sha256_hex(weights.read_bytes()), record.revision)
                and config_matches(record, config.read_bytes())):
            return dest
        files = self._read(record, where)
        if not config_matches(record, files[CONFIG_FILE]):
            raise config_refused(record, files[CONFIG_FILE])
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=self.root))
        try:
            for name, data in files.items():
                (staging / name).write_bytes(data)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dest

    def _where(self, record: AdapterRecord) -> tuple[str, str] | Path:
        """(bucket, prefix) of an S3 location, or the confined local folder; AdapterUnavailable if refused."""
        from imgq.refs import confine, split_s3

        try:
            if record.location.startswith("s3://"):
                bucket, prefix = split_s3(record.location, self._settings.allowed_buckets)
                return bucket, prefix.rstrip("/")
            return confine(Path(record.location), self._settings.local_roots)
        except errors.RefRefused as exc:
            raise errors.AdapterUnavailable(f"adapter {record.name!r} at {record.location}: {exc.message}") from None

    def _read(self, record: AdapterRecord, where: tuple[str, str] | Path) -> dict[str, bytes]:
        limits = ((CONFIG_FILE, _MAX_CONFIG_BYTES), (WEIGHTS_FILE, _MAX_WEIGHTS_BYTES))
        try:
            if isinstance(where, tuple):
                bucket, prefix = where
                return {name: self._get(bucket, f"{prefix}/{name}".lstrip("/"), limit) for name, limit in limits}
            return {name: _read_beneath(where / name, self._settings.local_roots, limit) for name, limit in limits}
        except errors.ImgqError as exc:
            raise errors.AdapterUnavailable(f"adapter {record.name!r}: cannot read {record.location}: "
                                            f"{exc.message}") from None
        except OSError as exc:  # deleted, unreadable: the adapter's, not the image's (not_found)
            raise errors.AdapterUnavailable(f"adapter {record.name!r}: cannot read {record.location}: "
                                            f"{exc.strerror or exc}") from None
        except Exception as exc:
            if not type(exc).__module__.startswith(("botocore", "boto3")):
                raise
            raise errors.AdapterUnavailable(f"adapter {record.name!r}: cannot read {record.location}: "
                                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

    def _get(self, bucket: str, key: str, limit: int) -> bytes:
        if self._s3 is None:
            from imgq.s3 import make_s3_client

            self._s3 = make_s3_client(self._settings)
        resp = self._s3.get_object(Bucket=bucket, Key=key)
        body = resp["Body"]
        try:
            if int(resp.get("ContentLength", 0)) > limit:
                raise errors.TooLarge(f"s3://{bucket}/{key} is over {limit} bytes")
            return bytes(body.read())
        finally:
            body.close()


def _read_beneath(path: Path, roots: list[Path], limit: int) -> bytes:
    from imgq.worker.beneath import open_beneath

    fd = open_beneath(path, roots)  # no symlink in any component, regular files only
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise errors.TooLarge(f"{path} is over {limit} bytes")
    return data


# -- the bank -----------------------------------------------------------------------------------------------

_Key = tuple[str, str, str]  # name, revision, config digest ("" when the record pins none)


def _key(record: AdapterRecord) -> _Key:
    return record.name, record.revision, record.config_sha256 or ""


class AdapterBank:
    """LoRA adapters on one :class:`~imgq.worker.model.CaptionModel`, at most ``capacity`` loaded.

    ``fetch_dir(record)`` returns a local folder with the adapter's files (:class:`AdapterFiles` in a
    worker); None reads ``record.location`` as a trusted local folder (tests, benchmarks). ``resolve(name)``
    turns a name into its record (a worker: ``Adapters(engine).require(name, model.name, model.revision)``);
    without it, :meth:`caption` takes records only."""

    def __init__(self, model: Any, fetch_dir: Callable[[AdapterRecord], Path] | None = None, capacity: int = 8,
                 *, resolve: Callable[[str], AdapterRecord] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.model = model
        self.capacity = capacity
        self._fetch_dir = fetch_dir
        self._resolve = resolve
        self._lock = threading.RLock()
        self._tuner: Any = None  # peft LoraModel, once the first adapter loads
        # (name, revision, config digest) -> peft name, least recently used first: an adapter registered again
        # with another config but the same weights is another slot, not the loaded one.
        self._slots: OrderedDict[_Key, str] = OrderedDict()
        self._serial = 0
        self.loads = 0  # adapters loaded from files so far (tests and metrics)

    @classmethod
    def for_worker(cls, model: Any, settings: Any, engine: Any, s3_client: Any | None = None) -> AdapterBank:
        """The bank a worker builds: files through :class:`AdapterFiles`, names through the registry, checked
        against the caption model being served (name and revision); an unknown or mismatched name raises
        AdapterUnavailable (permanent), as a worker must."""
        from imgq.db.adapters import Adapters

        registry = Adapters(engine)

        def resolve(name: str) -> AdapterRecord:
            try:
                return registry.require(name, model.name, model.revision)
            except errors.UnknownAdapter as exc:  # at enqueue a bad request; here the item can never succeed
                # The registry's message lists every adapter and names the model: the operators', kept in
                # the log. The dead letter, which the job's tenant reads in its results, says only why.
                log.warning("adapter %r refused: %s", name, exc.message, extra={"action": "adapter_refused"})
                if registry.get(name) is None:
                    raise errors.AdapterUnavailable(f"no adapter named {name!r} is registered now (withdrawn after "
                                                    "the job was accepted?)") from None
                raise errors.AdapterUnavailable(f"adapter {name!r} was trained on another caption model or revision "
                                                "than the workers serve; an operator must register it again or "
                                                "retrain it") from None

        return cls(model, AdapterFiles(settings, s3_client), settings.adapter_cache, resolve=resolve)

    # -- names and records -------------------------------------------------------------------------------

    def resolve(self, adapters: Sequence[str | AdapterRecord | None]) -> list[AdapterRecord | None]:
        """Records for a batch's names, each distinct name looked up once. A caller that stores the captions
        resolves first and passes the records, so ``via_revision`` is the revision that ran."""
        cache: dict[str, AdapterRecord] = {}
        out: list[AdapterRecord | None] = []
        for item in adapters:
            if item is None or isinstance(item, AdapterRecord):
                out.append(item)
                continue
            if item not in cache:
                if self._resolve is None:
                    raise errors.UnknownAdapter(f"adapter {item!r}: this bank resolves no names; pass its record")
                cache[item] = self._resolve(item)
            out.append(cache[item])
        return out

    @property
    def loaded(self) -> list[str]:
        """Names of the loaded adapters, least recently used first."""
        with self._lock:
            return [key[0] for key in self._slots]

    # -- loading -----------------------------------------------------------------------------------------

    def load(self, record: AdapterRecord) -> str:
        """Load ``record`` if it is not loaded (evicting the least recently used beyond capacity); return
        its peft adapter name."""
        with self._lock:
            slot = self._ensure(record, keep=set())
            self._trim(keep={_key(record)})
            return slot

    def _ensure(self, record: AdapterRecord, keep: set[_Key]) -> str:
        key = _key(record)
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
            return slot
        # Make room first, but never by evicting an adapter the current batch needs.
        while len(self._slots) >= self.capacity and self._evict_one(keep):
            pass
        slot = self._inject(record)
        self._slots[key] = slot
        return slot

    def _trim(self, keep: set[_Key]) -> None:
        while len(self._slots) > self.capacity and self._evict_one(keep):
            pass

    def _evict_one(self, keep: set[_Key]) -> bool:
        for key, slot in self._slots.items():
            if key not in keep:
                del self._slots[key]
                self._tuner.delete_adapter(slot)
                log.info("adapter evicted", extra={"action": "adapter_evicted", "adapter": key[0],
                                                   "revision": key[1]})
                return True
        return False

    def _inject(self, record: AdapterRecord) -> str:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load as load_safetensors

        model = self.model
        model.load()
        if record.base_model != model.name:
            raise errors.AdapterUnavailable(f"adapter {record.name!r} was trained on {record.base_model!r}, not on "
                                            f"the served caption model {model.name!r}")
        folder = Path(record.location) if self._fetch_dir is None else self._fetch_dir(record)
        try:
            weights = (folder / WEIGHTS_FILE).read_bytes()
        except OSError as exc:
            raise errors.AdapterUnavailable(f"adapter {record.name!r}: cannot read {WEIGHTS_FILE}: "
                                            f"{exc.strerror or exc}") from None
        digest = sha256_hex(weights)
        if not matches(digest, record.revision):
            raise errors.AdapterUnavailable(f"adapter {record.name!r}: {WEIGHTS_FILE} has SHA-256 {digest[:16]}..., "
                                            f"not its registered revision {record.revision[:16]}...; refused")
        try:
            config_bytes = (folder / CONFIG_FILE).read_bytes()
        except OSError as exc:
            raise errors.AdapterUnavailable(f"adapter {record.name!r}: cannot read {CONFIG_FILE}: "
                                            f"{exc.strerror or exc}") from None
        if not config_matches(record, config_bytes):
            raise config_refused(record, config_bytes)
        config = lora_config(record.name, config_bytes)  # from the bytes just verified: what runs was checked
        config.inference_mode = True
        self._serial += 1
        slot = f"a{self._serial}"  # peft names are ModuleDict keys: no dots; the record's _key maps to it
        state = {k.removeprefix("base_model.model."): v for k, v in load_safetensors(weights).items()}
        try:
            if self._tuner is None:
                from peft.tuners.lora import LoraModel

                self._tuner = LoraModel(model._model, config, slot)
            else:
                self._tuner.peft_config[slot] = config
                self._tuner.inject_adapter(self._tuner.model, slot)
            result = set_peft_model_state_dict(model._model, state, adapter_name=slot)
            unexpected = [k for k in result.unexpected_keys if "lora_" in k]
            missing = [k for k in result.missing_keys if f".{slot}." in k]
            if unexpected or missing:
                raise ValueError(f"weights do not fit the layout: missing {missing[:2]}, unexpected {unexpected[:2]}")
        except Exception as exc:
            if self._tuner is not None and slot in self._tuner.peft_config:
                self._tuner.delete_adapter(slot)
            raise errors.AdapterUnavailable(f"adapter {record.name!r} does not fit caption model {model.name!r}: "
                                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        finally:
            if self._tuner is not None:
                # Nothing active: a call without adapter_names is the base model (and eval mode, which
                # peft requires for adapter_names).
                self._tuner.set_adapter([], inference_mode=True)
                self._tuner.eval()
        self.loads += 1
        log.info("adapter loaded", extra={"action": "adapter_loaded", "adapter": record.name,
                                          "revision": record.revision, "lang": record.lang})
        return slot

    # -- inference ---------------------------------------------------------------------------------------

    def caption(self, pixel_values: np.ndarray, params: CaptionParams,
                adapters: Sequence[str | AdapterRecord | None]) -> list[str]:
        """One caption per image of a (B, 3, H, W) batch, row ``i`` written by ``adapters[i]`` (a name, a
        record, or None for the base model), all in ONE batched ``generate``."""
        if len(adapters) != len(pixel_values):
            raise ValueError(f"{len(adapters)} adapters for a batch of {len(pixel_values)} images")
        records = self.resolve(adapters)
        if all(r is None for r in records):
            return self.model.caption(pixel_values, params)
        with self._lock:
            keep = {_key(r) for r in records if r is not None}
            slots = {_key(r): self._ensure(r, keep) for r in records if r is not None}
            names = [BASE if r is None else slots[_key(r)] for r in records]
            try:
                with self._tuner._enable_peft_forward_hooks(adapter_names=names, num_beams=params.num_beams):
                    return self.model.caption(pixel_values, params)
            finally:
                self._trim(keep=set())  # back to capacity, least recently used first
