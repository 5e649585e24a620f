"""Why a file transfer failed, as libchat errors with stable codes::

    ChatError
    └── TransferError            a transfer failed (code "transfer_failed")
        ├── Declined             the recipient said no
        ├── NotOnline            the recipient is not connected
        ├── FileTooLarge         over the server's max_file_size
        ├── NoAnswer             the recipient did not answer in time
        ├── Interrupted          a side left, the connection dropped, or an abort
        └── HashMismatch         the bytes received do not hash to the offer's SHA-256

The server raises :class:`FileTooLarge` itself, so its code travels on the
wire; the others are how the sending client reports the outcome.
"""

from __future__ import annotations

from libchat import ChatError


class TransferError(ChatError):
    code = "transfer_failed"


class Declined(TransferError):
    code = "declined"


class NotOnline(TransferError):
    code = "not_online"


class FileTooLarge(TransferError):
    code = "file_too_large"


class NoAnswer(TransferError):
    code = "no_answer"


class Interrupted(TransferError):
    code = "interrupted"


class HashMismatch(TransferError):
    code = "hash_mismatch"
