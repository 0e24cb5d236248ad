"""One error tree. Users see the stable ``code`` of a permanent error in the dead-letter store."""

from __future__ import annotations


class ImgqError(Exception):
    """An imgq operation failed."""

    code = "error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or self.code).strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class Retryable(ImgqError):
    """A transient failure: the same work may succeed if tried again later."""

    code = "transient"


class Permanent(ImgqError):
    """The item can never succeed as submitted; it is dead-lettered on the first try."""

    code = "permanent"


class InvalidRequest(ImgqError):
    """A request was refused before anything was accepted."""

    code = "invalid_request"


# Stable codes: documented in README "Error codes"; never rename one.
class NotFound(Permanent):
    """The object or file does not exist."""

    code = "not_found"


class AccessDenied(Permanent):
    """The store refused access to the object."""

    code = "access_denied"


class Empty(Permanent):
    """The object has zero bytes."""

    code = "empty"


class TooLarge(Permanent):
    """The object is larger than IMGQ_MAX_OBJECT_BYTES."""

    code = "too_large"


class NotAnImage(Permanent):
    """The bytes are not an image Pillow recognises."""

    code = "not_an_image"


class UnsupportedFormat(Permanent):
    """The image format is not on the decoder allow-list."""

    code = "unsupported_format"


class Truncated(Permanent):
    """The image data ends early or is corrupt."""

    code = "truncated"


class TooManyPixels(Permanent):
    """The image exceeds IMGQ_MAX_PIXELS (decompression-bomb guard)."""

    code = "too_many_pixels"


class BadRef(Permanent):
    """The reference is malformed or outside the allow-lists."""

    code = "bad_ref"


class ModelError(Permanent):
    """The model failed on this single item."""

    code = "model_error"


class DecodeTimeout(Permanent):
    """Decoding the image took longer than IMGQ_DECODE_TIMEOUT_S."""

    code = "decode_timeout"


class NotAFile(Permanent):
    """The path is not a regular file (a FIFO, socket, device or directory)."""

    code = "not_a_file"


class BadText(Permanent):
    """The pair's text is empty or longer than the model's text positions."""

    code = "bad_text"


class WrongModel(Permanent):
    """No task of the message is one this worker serves (kind or model differs)."""

    code = "wrong_model"


class UnsupportedLanguage(Permanent):
    """The worker's translation model cannot write a language the job asked for."""

    code = "unsupported_language"


class PromptTooLong(Permanent):
    """The caption prompt's tokens plus max_new_tokens exceed the decoder's text positions."""

    code = "prompt_too_long"


class AdapterUnavailable(Permanent):
    """The job's adapter is not registered for the worker's caption model, or its files do not
    match its registered revision."""

    code = "adapter_unavailable"


class ModelUnhealthy(Retryable):
    """Every item of a batch failed: the model or device is suspect, not the items."""

    code = "model_unhealthy"


class OutOfMemory(Retryable):
    """The accelerator ran out of memory even for a single item; tried again later."""

    code = "out_of_memory"


class BadParams(InvalidRequest):
    """Generation parameters are invalid."""

    code = "bad_params"


class UnknownLanguage(BadParams):
    """A language code imgq does not know (``imgq.languages``)."""

    code = "unknown_language"


class UnknownAdapter(BadParams):
    """No adapter is registered under that name, or it was trained for another caption model."""

    code = "unknown_adapter"


class RefRefused(InvalidRequest):
    """A reference is malformed or outside the allow-lists."""

    code = "bad_ref"


class CallbackRefused(InvalidRequest):
    """The callback URL is not allowed (scheme, userinfo, or host not on IMGQ_CALLBACK_HOSTS)."""

    code = "callback_not_allowed"


class BackfillRunning(ImgqError):
    """Another run of this backfill holds its lock (it runs elsewhere); this one did nothing."""

    code = "backfill_running"


class BackfillCancelled(ImgqError):
    """The run's job was cancelled (DELETE /v1/jobs/{id}); the run stopped before its next page."""

    code = "backfill_cancelled"


class BackfillLockLost(ImgqError):
    """The session holding the run's lock ended; the run stopped before writing anything more."""

    code = "backfill_lock_lost"


class BadAge(InvalidRequest):
    """An age option is negative or malformed."""

    code = "bad_age"


class CostLimitExceeded(InvalidRequest):
    """A job's parameters exceed its tenant's cost limits (num_beams, max_new_tokens, item cost)."""

    code = "cost_limit_exceeded"


class ModelUnavailable(ImgqError):
    """The model could not be loaded."""

    code = "model_unavailable"


class ConfigError(ImgqError):
    """The configuration is inconsistent."""

    code = "config_error"


class SearchError(InvalidRequest):
    """A search cannot be answered as asked."""

    code = "search_error"


class NoEmbeddings(SearchError):
    """No stored embeddings for this model (and revision)."""

    code = "no_embeddings"


class DimensionMismatch(SearchError):
    """The query vector's dimension differs from the stored embeddings'."""

    code = "dim_mismatch"


class EmptyQuery(SearchError):
    """The search query is empty."""

    code = "empty_query"


class VectorIndexError(ImgqError):
    """The vector index could not be built: another session is building it, or it is not valid after the build."""

    code = "vector_index"
