"""A scripted stand-in for a coding agent, so the demo runs with no API key.

Runs inside the guest: reads a prompt on argv, "thinks" with real CPU work,
answers on stdout.  Deterministic, stdlib only.
"""

import hashlib
import sys
import time


def pi_digits(n: int) -> str:
    """Gibbons' unbounded spigot: real work, exact digits."""
    digits: list[str] = []
    q, r, t, k, m, x = 1, 0, 1, 1, 3, 3
    while len(digits) < n:
        if 4 * q + r - t < m * t:
            digits.append(str(m))
            q, r, m = 10 * q, 10 * (r - m * t), (10 * (3 * q + r)) // t - 10 * m
        else:
            q, r, t, k, m, x = q * k, (2 * q + r) * x, t * x, k + 1, (q * (7 * k + 2) + r * x) // (t * x), x + 2
    return digits[0] + "." + "".join(digits[1:])


def answer(prompt: str) -> str:
    words = prompt.lower()
    if "pi" in words.split():
        return f"pi to 60 places is {pi_digits(61)}"
    if "hash" in words:
        return f"sha256 of the prompt is {hashlib.sha256(prompt.encode()).hexdigest()[:16]}..."
    return f"the prompt has {len(prompt.split())} words; its longest is {max(prompt.split(), key=len)!r}"


if __name__ == "__main__":
    started = time.monotonic()
    print(answer(" ".join(sys.argv[1:])))
    print(f"(offline agent, {time.monotonic() - started:.2f} s in the guest)", file=sys.stderr)
