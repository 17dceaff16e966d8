"""Expected failures: the worker answers them with their message and goes on.

Anything else that goes wrong is unexpected: it is logged with its traceback
and answered in short. Input errors live with the contract, in ``src.schema``.
"""


class WorkerError(RuntimeError):
    """A failure the user can act on; its message says what happened and what to do."""


class ModelLoadError(WorkerError):
    """The model cannot be loaded; the message names the model and the ways out."""


class AdapterError(WorkerError):
    """A file in an allow-listed folder (EMBEDDINGS_DIR) cannot be used; the message names it and why."""


class StorageError(WorkerError):
    """An S3 upload failed after boto3's retries; the message names endpoint, bucket and error code."""


class ResponseTooLargeError(WorkerError):
    """The inline answer is larger than RunPod accepts; the message gives the ways out."""


class AdmissionError(WorkerError):
    """The request cannot fit on this GPU even one image at a time; refused before any work."""


class GenerationTimeoutError(WorkerError):
    """The job ran past GENERATION_TIMEOUT_SECONDS and was stopped at a denoising step."""


class JobCancelledError(WorkerError):
    """The job was cancelled (RunPod's stop signal) and left the GPU at its next step, or before it got it."""


class OutOfMemoryError(WorkerError):
    """The GPU ran out of memory, and the frugal retry did too."""


class BadImageError(WorkerError):
    """The decoded images hold NaN or infinity even after a float32 decode."""


# The CUDA runtime's words for its "sticky" errors: after one, the process's CUDA context is lost, and every later
# CUDA call fails the same way until the process ends. torch raises them as torch.AcceleratorError (a RuntimeError),
# or as a plain RuntimeError from older code paths, with the runtime's message after "CUDA error: "; a compiled
# (FAST_MODE) kernel's launch says "CUDA driver error: " (inductor's static launcher, AT_CUDA_DRIVER_CHECK) or
# "Triton Error [CUDA]: " (Triton's own launcher), with the driver's words, which are the runtime's.
_CUDA_ERROR_PREFIXES = ("CUDA error: ", "CUDA driver error: ", "Triton Error [CUDA]: ")
_STICKY_CUDA_ERRORS = (
    "an illegal memory access was encountered",
    "device-side assert triggered",
    "unspecified launch failure",
    "misaligned address",
    "an illegal instruction was encountered",
    "invalid program counter",
    "uncorrectable ECC error encountered",
    "the launch timed out and was terminated",
    "hardware stack error",
)


def breaks_the_gpu(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised while handling, is a CUDA error that leaves the GPU unusable
    for the rest of the process (an illegal memory access, a device-side assert, ...)."""
    seen: BaseException | None = error
    while seen is not None:
        message = str(seen)
        if isinstance(seen, RuntimeError):
            reasons = [message.split(prefix, 1)[1] for prefix in _CUDA_ERROR_PREFIXES if prefix in message]
            if any(reason.startswith(_STICKY_CUDA_ERRORS) for reason in reasons):
                return True
        seen = seen.__cause__ or seen.__context__
    return False


def first_line(error: BaseException) -> str:
    """The first line of an error's message (at most 300 characters), or its type's name when it has none."""
    return (str(error).splitlines() or [type(error).__name__])[0][:300]


def clipped(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters, with "..." when it was longer: for echoing input in a message."""
    return text if len(text) <= limit else text[:limit] + "..."
