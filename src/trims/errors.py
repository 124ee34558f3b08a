"""Every error trims raises, in one tree.

::

    TrimsError
    ├── ConfigError                  a bad flag, size or path given to trims itself
    ├── ModelMismatch                a framework module that does not fit the stored tensors
    ├── ProtocolError                bytes on the socket that are not a valid trims frame
    │   ├── LocalProtocolError       this side was about to send something invalid (a bug here)
    │   └── RemoteProtocolError      the peer sent something invalid
    ├── DaemonUnavailable            no daemon answers on the socket
    │   ├── ConnectionLost           the daemon went away in the middle of a request
    │   └── PeerStalled              no answer, or no whole frame, within the time allowed
    └── RequestError                 the daemon understood the request and refused it
        ├── PermissionDenied         your uid is not a tenant, or your tenant lacks the role
        ├── InvalidName              a model name that is not NAME[:TAG]
        ├── ModelNotFound            no model by that name (or not visible to you)
        ├── InvalidModel             a file that is not a sound model (safetensors, checkpoint, ONNX)
        │   └── UnsupportedFormat    a sound file of a kind not shared (legacy pickle, TorchScript)
        ├── ModelBusy                the model is leased and cannot be evicted now
        ├── CapacityError            the model does not fit in the memory trims was given
        ├── QuotaExceeded            your tenant's share of leased or pushed bytes is used up
        ├── IntegrityError           stored bytes no longer match their digest
        │   └── DamagedCopy          (in the daemon) one tier's copy is corrupt or gone: it is dropped
        ├── StorageError             the store could not be read or written (disk full, I/O)
        ├── GpuError                 no usable GPU, or the CUDA driver refused a call
        └── InternalError            a bug in the daemon; it kept serving

A :class:`RequestError` travels over the wire as ``(code, message)``; each subclass owns
one code, so the client raises the same class the daemon raised (``DamagedCopy`` never
leaves the daemon as such: a client sees its parent).
"""

from __future__ import annotations

__all__ = [
    "TrimsError",
    "ConfigError",
    "ModelMismatch",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "DaemonUnavailable",
    "ConnectionLost",
    "PeerStalled",
    "RequestError",
    "PermissionDenied",
    "InvalidName",
    "ModelNotFound",
    "InvalidModel",
    "UnsupportedFormat",
    "ModelBusy",
    "CapacityError",
    "QuotaExceeded",
    "IntegrityError",
    "StorageError",
    "GpuError",
    "InternalError",
]


class TrimsError(Exception):
    """Base of every error trims raises on purpose."""


class ConfigError(TrimsError):
    """A flag, size, environment variable or path given to trims is unusable."""


class ModelMismatch(TrimsError):
    """An adapter built a module whose parameters do not match the model's stored tensors."""


class ProtocolError(TrimsError):
    """Bytes on the socket that are not a valid trims frame."""


class LocalProtocolError(ProtocolError):
    """This side tried to encode an invalid message: a bug in the caller."""


class RemoteProtocolError(ProtocolError):
    """The peer sent an invalid frame; the connection cannot be trusted any further."""


class DaemonUnavailable(TrimsError, ConnectionError):
    """No trims daemon answers on the socket."""


class ConnectionLost(DaemonUnavailable):
    """The connection to the daemon closed in the middle of a request."""


class PeerStalled(DaemonUnavailable):
    """The peer sent no answer, or no whole frame, within the time allowed. The connection
    itself may be sound: a client's request that times out gives up alone, and its reply,
    should it come, is dropped."""


class RequestError(TrimsError):
    """The daemon refused a request. ``code`` names the reason on the wire."""

    code = "request_error"


class PermissionDenied(RequestError):
    code = "permission_denied"


class InvalidName(RequestError):
    code = "invalid_name"


class ModelNotFound(RequestError, KeyError):
    code = "model_not_found"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidModel(RequestError):
    code = "invalid_model"


class UnsupportedFormat(InvalidModel):
    """A sound file of a kind trims does not share (a legacy torch.save pickle, a TorchScript
    archive): load it as before, or save its weights as safetensors."""

    code = "unsupported_format"


class ModelBusy(RequestError):
    code = "model_busy"


class CapacityError(RequestError):
    code = "capacity"


class QuotaExceeded(RequestError):
    code = "quota"


class IntegrityError(RequestError):
    code = "integrity"


class DamagedCopy(IntegrityError):
    """One tier's copy of a segment failed its digests, or its file is gone: that copy must
    not be read again (an I/O error that may pass, such as too many open files, is a
    StorageError instead)."""


class StorageError(RequestError):
    code = "storage"


class DiskFull(StorageError):
    """The filesystem under the store has no room (whatever --disk allows)."""


class CloudReadFailed(StorageError):
    """The cloud tier could not be read (after its retries): not the local disk's fault."""


class GpuError(RequestError):
    """The GPU tier cannot serve: no CUDA driver or device, no VMM support, or a driver call failed."""

    code = "gpu"


class InternalError(RequestError):
    code = "internal"


_BY_CODE = {
    cls.code: cls
    for cls in (
        RequestError,
        PermissionDenied,
        InvalidName,
        ModelNotFound,
        InvalidModel,
        UnsupportedFormat,
        ModelBusy,
        CapacityError,
        QuotaExceeded,
        IntegrityError,
        StorageError,
        GpuError,
        InternalError,
    )
}


def error_for_code(code: str, message: str) -> RequestError:
    """The exception a daemon's error reply stands for; unknown codes stay RequestError."""
    cls = _BY_CODE.get(code, RequestError)
    error = cls(message)
    if cls is RequestError:
        error.code = code
    return error
