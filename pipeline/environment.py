"""Failures of the environment that no retry can fix: a full disk, a read-only filesystem, no permission, an S3
bucket that denies access or does not exist, missing credentials. `problem_of(exc)` names one (what, where, what to
do) so that a command can stop with one line instead of retrying or printing a traceback; None for anything else
(transient errors are storage.transient_kind's business, bugs keep their traceback for the log).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

NO_SPACE = "no_space"
READ_ONLY = "read_only"
NO_PERMISSION = "no_permission"
ACCESS_DENIED = "access_denied"
NO_BUCKET = "no_bucket"
NO_CREDENTIALS = "no_credentials"

_ACCESS_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem", "403"})
_CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                               "TokenRefreshRequired"})
_CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                      "NoAuthTokenError", "UnauthorizedSSOTokenError")


@dataclass(frozen=True)
class Problem:
    """An environment failure: `kind` (one of the constants above), `what` in words, the `path` it hit (None when
    unknown) and what to do about it (`fix`, which may name the flag through `{flag}`)."""

    kind: str
    what: str
    path: str | None
    fix: str

    def line(self, flag: str = "--output") -> str:
        """'no space left on the device writing /x: free space there or choose another --output'."""
        where = f" ({self.path})" if self.path else ""
        return f"{self.what}{where}: {self.fix.format(flag=flag)}"


def _error_code(exc: BaseException) -> str:
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            return str(response["Error"].get("Code", ""))
    return ""


def problem_of(exc: BaseException) -> Problem | None:
    """The environment failure `exc` is (itself or through its cause), or None."""
    chain = [e for e in (exc, exc.__cause__, exc.__context__) if e is not None]
    if any(type(e).__name__ in _CREDENTIAL_ERRORS for e in chain):
        return Problem(NO_CREDENTIALS, "no usable S3 credentials", None,
                       "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, an instance role) on every node")
    code = _error_code(exc)
    path = getattr(exc, "filename", None)
    path = str(path) if path else None
    remote = bool(path and "://" in path)
    if code in _CREDENTIAL_CODES:
        return Problem(NO_CREDENTIALS, f"S3 refused the credentials ({code})", path,
                       "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) on every node")
    if code == "NoSuchBucket" or (isinstance(exc, FileNotFoundError) and "bucket does not exist" in str(exc)):
        return Problem(NO_BUCKET, "the S3 bucket does not exist", path, "create it or choose another {flag}")
    if not isinstance(exc, OSError):
        return None
    if code in _ACCESS_CODES or (isinstance(exc, PermissionError) and remote):
        return Problem(ACCESS_DENIED, "S3 denied access", path,
                       "give these credentials read and write access to that prefix, or choose another {flag}")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        return Problem(NO_SPACE, what, path, "free space on that filesystem, or choose another {flag}")
    if exc.errno == errno.EROFS:
        return Problem(READ_ONLY, "read-only filesystem", path, "choose another {flag} on a writable filesystem")
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
        return Problem(NO_PERMISSION, "permission denied", path,
                       "fix its permissions for this user (on every node), or choose another {flag}")
    return None
