"""Username/password checks (RFC 1929) against clear-text or hashed secrets.

A secret is the password itself, or a hash made by `python -m osocks.auth`:

    $pbkdf2-sha256$ITERATIONS$SALT_HEX$HASH_HEX
    $scrypt$N$R$P$SALT_HEX$HASH_HEX
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sys
from collections.abc import Iterable

from .settings import User

_PROCESS_KEY = os.urandom(32)
_verified: set[bytes] = set()  # keyed digests of (user, password, secret) already checked against a hash
_MAX_VERIFIED = 4096


def hash_password(password: str, salt: bytes | None = None, iterations: int = 200_000) -> str:
    salt = salt or os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"$pbkdf2-sha256${iterations}${salt.hex()}${digest.hex()}"


MAX_PASSWORD_BYTES = 255  # RFC 1929


def hashed_secret(password: str) -> str:
    """The hash to store for a new password (ubus `hash_password`); ValueError when RFC 1929 cannot carry it."""
    if not password:
        raise ValueError("the password is empty")
    if len(password.encode()) > MAX_PASSWORD_BYTES:
        raise ValueError(f"the password is longer than {MAX_PASSWORD_BYTES} bytes (RFC 1929)")
    return hash_password(password)


def _matches_hash(secret: str, password: bytes) -> bool:
    parts = secret.split("$")
    try:
        if parts[1] == "pbkdf2-sha256" and len(parts) == 5:
            iterations, salt, expected = int(parts[2]), bytes.fromhex(parts[3]), bytes.fromhex(parts[4])
            digest = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
        elif parts[1] == "scrypt" and len(parts) == 7:
            n, r, p = int(parts[2]), int(parts[3]), int(parts[4])
            salt, expected = bytes.fromhex(parts[5]), bytes.fromhex(parts[6])
            digest = hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=128 * 1024 * 1024, dklen=len(expected))
        else:
            return False
    except (ValueError, IndexError):
        return False
    return hmac.compare_digest(digest, expected)


def is_hashed(secret: str) -> bool:
    return secret.startswith(("$pbkdf2-sha256$", "$scrypt$"))


def check_secret(secret: str, password: bytes) -> bool:
    if not is_hashed(secret):
        return hmac.compare_digest(secret.encode(), password)
    key = hmac.digest(_PROCESS_KEY, secret.encode() + b"\0" + password, "sha256")
    if key in _verified:
        return True
    if not _matches_hash(secret, password):
        return False
    if len(_verified) >= _MAX_VERIFIED:
        _verified.clear()
    _verified.add(key)
    return True


def quick_check(users: Iterable[User], username: bytes, password: bytes) -> bool | None:
    """The verdict when it needs no hashing (clear text, or a hash already verified); else None."""
    found = False
    for user in users:
        if hmac.compare_digest(user.name.encode(), username):
            if is_hashed(user.secret):
                key = hmac.digest(_PROCESS_KEY, user.secret.encode() + b"\0" + password, "sha256")
                if key not in _verified:
                    return None
                found = True
            else:
                found = hmac.compare_digest(user.secret.encode(), password) or found
    return found


def check_password(users: Iterable[User], username: bytes, password: bytes) -> bool:
    """True when a configured user has this name and password; compares in constant time."""
    found = False
    for user in users:
        if hmac.compare_digest(user.name.encode(), username):
            found = check_secret(user.secret, password) or found
    if not found:
        hmac.compare_digest(password, password)  # same work whether or not the name exists
    return found


def main(argv: list[str] | None = None) -> int:
    """python -m osocks.auth USER  →  prints USER:$pbkdf2-sha256$... for -U files and UCI."""
    import getpass

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m osocks.auth USER   (reads the password from the terminal or stdin)", file=sys.stderr)
        return 2
    password = getpass.getpass() if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    print(f"{args[0]}:{hash_password(password)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
