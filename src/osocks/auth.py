"""Username/password checks (RFC 1929) against clear-text or hashed secrets.

A secret is the password itself, or a hash made by `python -m osocks.auth`:

    $pbkdf2-sha256$ITERATIONS$SALT_HEX$HASH_HEX
    $scrypt$N$R$P$SALT_HEX$HASH_HEX

What a failed login costs does not depend on whether the name exists: when any
user's secret is hashed, every failure runs one hash in the executor (a dummy
one when the name is unknown or its secret is clear text), with the parameters
of a configured hashed user.  Successes are not hidden: a clear-text one, or a
hash already verified (remembered, keyed with a per-process secret), answers at
once; the first one of a hashed user costs its hash.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .settings import User

SCHEMES = ("pbkdf2-sha256", "scrypt")
PBKDF2_ITERATIONS = 200_000
SCRYPT_N, SCRYPT_R, SCRYPT_P = 16384, 8, 1
SCRYPT_MAXMEM = 128 * 1024 * 1024
MAX_PASSWORD_BYTES = 255  # RFC 1929
MAX_ITERATIONS = 2**31 - 1  # what OpenSSL's PBKDF2 takes

_PROCESS_KEY = os.urandom(32)
_verified: set[bytes] = set()  # keyed digests of (secret, password) already checked against a hash
_MAX_VERIFIED = 4096
_dummies: dict[tuple[str, ...], str] = {}  # a hash's parameters → a secret no password matches


def hash_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    salt = salt or os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"$pbkdf2-sha256${iterations}${salt.hex()}${digest.hex()}"


def hashed_secret(password: str) -> str:
    """The hash to store for a new password (ubus `hash_password`); ValueError when RFC 1929 cannot carry it."""
    if not password:
        raise ValueError("the password is empty")
    if len(password.encode()) > MAX_PASSWORD_BYTES:
        raise ValueError(f"the password is longer than {MAX_PASSWORD_BYTES} bytes (RFC 1929)")
    return hash_password(password)


def hash_scrypt(
    password: str, salt: bytes | None = None, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P
) -> str:
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=32)
    return f"$scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


def is_hashed(secret: str) -> bool:
    return secret.startswith(("$pbkdf2-sha256$", "$scrypt$"))


def hash_problem(secret: str) -> str | None:
    """What is wrong with a secret written as a hash (`$scheme$...`); None for a good hash or clear text."""
    parts = secret.split("$")
    scheme = parts[1] if len(parts) > 2 and parts[0] == "" else ""
    if not scheme or not all(c.isascii() and (c.isalnum() or c == "-") for c in scheme):
        return None  # clear text that happens to start with "$"
    if scheme not in SCHEMES:
        return (
            f"'${scheme}$' is not a hash osocks knows ({', '.join(SCHEMES)}); a password that starts"
            " like one is given as its hash (python3 -m osocks.auth)"
        )
    if scheme == "pbkdf2-sha256":
        form = "$pbkdf2-sha256$ITERATIONS$SALT_HEX$HASH_HEX"
        if len(parts) != 5:
            return f"a pbkdf2-sha256 hash is {form}"
        numbers, salt, digest = parts[2:3], parts[3], parts[4]
    else:
        form = "$scrypt$N$R$P$SALT_HEX$HASH_HEX"
        if len(parts) != 7:
            return f"an scrypt hash is {form}"
        numbers, salt, digest = parts[2:5], parts[5], parts[6]
    if not all(number.isdigit() and number.isascii() and int(number) > 0 for number in numbers):
        what = "ITERATIONS is a whole number" if len(numbers) == 1 else "N, R and P are whole numbers"
        return f"{what} above 0 ({form})"
    for name, text in (("SALT_HEX", salt), ("HASH_HEX", digest)):
        try:
            bytes.fromhex(text)
        except ValueError:
            return f"{name} is not hexadecimal ({form})"
    size = len(digest) // 2
    if scheme == "pbkdf2-sha256":
        if int(numbers[0]) > MAX_ITERATIONS:
            return f"ITERATIONS is {MAX_ITERATIONS} at most ({form})"
        if size != hashlib.sha256().digest_size:
            return f"HASH_HEX must be 32 bytes (64 hex digits), not {size} ({form})"
        return None
    n, r, p = (int(number) for number in numbers)
    if n < 2 or n & (n - 1):
        return f"N must be a power of 2, not {n}"
    if not 1 <= size <= 64:
        return f"HASH_HEX must be 1 to 64 bytes, not {size}"
    if 128 * r * (n + p + 2) > SCRYPT_MAXMEM or n >= 1 << min(16 * r, 64) or p * r >= 1 << 30:
        return f"N={n} R={r} P={p} need more than the {SCRYPT_MAXMEM >> 20} MiB osocks allows a check"
    return None


def _digest(secret: str, password: bytes) -> tuple[bytes, bytes]:
    """(what the password hashes to, what the secret holds) for a well-formed hash (see hash_problem)."""
    parts = secret.split("$")
    if parts[1] == "pbkdf2-sha256":
        iterations, salt, expected = int(parts[2]), bytes.fromhex(parts[3]), bytes.fromhex(parts[4])
        return hashlib.pbkdf2_hmac("sha256", password, salt, iterations), expected
    n, r, p = int(parts[2]), int(parts[3]), int(parts[4])
    salt, expected = bytes.fromhex(parts[5]), bytes.fromhex(parts[6])
    digest = hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=len(expected))
    return digest, expected


def _matches_hash(secret: str, password: bytes) -> bool:
    try:
        digest, expected = _digest(secret, password)
    except (ValueError, IndexError, OverflowError):  # settings refuse such hashes (hash_problem): a last guard
        return False
    return hmac.compare_digest(digest, expected)


def _key(secret: str, password: bytes) -> bytes:
    return hmac.digest(_PROCESS_KEY, secret.encode() + b"\0" + password, "sha256")


def check_secret(secret: str, password: bytes) -> bool:
    if not is_hashed(secret):
        return hmac.compare_digest(secret.encode(), password)
    key = _key(secret, password)
    if key in _verified:
        return True
    if not _matches_hash(secret, password):
        return False
    if len(_verified) >= _MAX_VERIFIED:
        _verified.clear()
    _verified.add(key)
    return True


def _find(users: Sequence[User], username: bytes) -> User | None:
    """The user of that name; every name is compared, so the time does not tell where it is."""
    found = None
    for user in users:
        if hmac.compare_digest(user.name.encode(), username):
            found = user
    return found


def quick_check(users: Sequence[User], username: bytes, password: bytes) -> bool | None:
    """The verdict when it needs no hashing: a success of a clear-text user or of a hash already verified,
    or any failure when no secret is hashed.  None: `check_password` has a hash to compute."""
    user = _find(users, username)
    if user is not None:
        if not is_hashed(user.secret):
            if hmac.compare_digest(user.secret.encode(), password):
                return True
        elif _key(user.secret, password) in _verified:
            return True
    if not any(is_hashed(u.secret) for u in users):
        return False
    return None


def check_password(users: Sequence[User], username: bytes, password: bytes) -> bool:
    """True when a configured user has this name and password.  When any secret is hashed, a failure
    costs one hash run whether or not the name exists (see the module's doc)."""
    user = _find(users, username)
    if user is not None and is_hashed(user.secret):
        return check_secret(user.secret, password)
    if user is not None and hmac.compare_digest(user.secret.encode(), password):
        return True
    hashed = [u.secret for u in users if is_hashed(u.secret)]
    if hashed:
        pick = int.from_bytes(hmac.digest(_PROCESS_KEY, b"dummy\0" + username, "sha256")[:4], "big")
        _matches_hash(_dummy(hashed[pick % len(hashed)]), password)
    return False


def _dummy(secret: str) -> str:
    """A hash with the parameters and sizes of `secret` that no password matches (a random digest)."""
    parts = secret.split("$")
    shape = (*parts[:-2], str(len(parts[-2])), str(len(parts[-1])))
    dummy = _dummies.get(shape)
    if dummy is None:
        if len(_dummies) >= 64:
            _dummies.clear()
        salt, digest = os.urandom(len(parts[-2]) // 2), os.urandom(len(parts[-1]) // 2)
        dummy = _dummies[shape] = "$".join((*parts[:-2], salt.hex(), digest.hex()))
    return dummy


# -- python3 -m osocks.auth ------------------------------------------------------------------------

USAGE = """\
usage: python3 -m osocks.auth [--scrypt] USER

Reads USER's password (from the terminal, or one line of stdin) and prints
USER:HASH, a line for an -U file or a UCI `list user`.

  --scrypt   $scrypt$16384$8$1$SALT$HASH instead of $pbkdf2-sha256$200000$SALT$HASH
  -h         this help
"""


class _Refused(Exception):
    """A user name, password or flag that would not make a usable line."""


def _name_problem(name: str) -> str | None:
    if not name:
        return "the user name is empty"
    if ":" in name:
        return f"{name!r}: a user name cannot contain ':' (it ends the name in user:password)"
    if name.startswith("#"):
        return f"{name!r}: a user name cannot start with '#' (the line would be a comment)"
    if name != name.strip() or not name.isprintable():
        return f"{name!r}: a user name cannot have spaces at either end or control characters"
    if len(name.encode()) > 255:
        return f"{name!r}: a user name is 255 bytes at most (RFC 1929)"
    return None


def _parse(args: list[str]) -> tuple[str, bool] | None:
    """(user, scrypt), or None for -h; _Refused for anything else."""
    words: list[str] = []
    scrypt = False
    for index, word in enumerate(args):
        if word == "--":
            words += args[index + 1 :]
            break
        if word in ("-h", "--help"):
            return None
        if word == "--scrypt":
            scrypt = True
        elif word.startswith("-") and word != "-":
            raise _Refused(f"unknown option {word!r}")
        else:
            words.append(word)
    if len(words) != 1:
        raise _Refused("give one USER")
    problem = _name_problem(words[0])
    if problem is not None:
        raise _Refused(problem)
    return words[0], scrypt


def _read_password() -> str:
    import getpass

    password = getpass.getpass() if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise _Refused("the password is empty")
    if len(password.encode()) > MAX_PASSWORD_BYTES:
        raise _Refused(f"a password is {MAX_PASSWORD_BYTES} bytes at most (RFC 1929)")
    return password


def main(argv: list[str] | None = None) -> int:
    """python -m osocks.auth [--scrypt] USER  →  prints USER:$pbkdf2-sha256$... for -U files and UCI."""
    try:
        parsed = _parse(sys.argv[1:] if argv is None else argv)
        if parsed is None:
            print(USAGE, end="")
            return 0
        name, scrypt = parsed
        password = _read_password()
    except _Refused as e:
        print(f"osocks.auth: {e} (python3 -m osocks.auth -h for help)", file=sys.stderr)
        return 2
    print(f"{name}:{hash_scrypt(password) if scrypt else hash_password(password)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
