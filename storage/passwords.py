"""Password hashes for the users file: stdlib scrypt, salted, compared in constant time.

A hash reads `scrypt$N$r$p$salt_hex$hash_hex`; `python -m storage hash-password` prints one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

PREFIX = "scrypt"
N, R, P = 2**14, 8, 1  # OWASP's scrypt floor (N=2^14, r=8, p=1): ~50 ms and 16 MiB per check
KEY_BYTES = 32


def hash_password(password: str) -> str:
    if not password:
        raise ValueError("the password is empty")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=KEY_BYTES)
    return f"{PREFIX}${N}${R}${P}${salt.hex()}${digest.hex()}"


def is_hash(value: str) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX + "$") and value.count("$") == 5


def verify_password(password: str, stored: str) -> bool:
    """True when `password` matches `stored` (a hash from hash_password, or a plaintext password)."""
    if not isinstance(password, str) or not isinstance(stored, str):
        return False
    if not is_hash(stored):
        return hmac.compare_digest(password.encode(), stored.encode())
    _, n, r, p, salt_hex, digest_hex = stored.split("$")
    try:
        n_i, r_i, p_i = int(n), int(r), int(p)
        salt, expected = bytes.fromhex(salt_hex), bytes.fromhex(digest_hex)
    except ValueError:
        return False
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n_i, r=r_i, p=p_i, dklen=len(expected), maxmem=2**26)
    return hmac.compare_digest(digest, expected)
