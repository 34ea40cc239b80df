#!/usr/bin/env python3
"""Writes the hand-made "shared DAG rendered as text" reproducers into fuzz/regressions/.

A pickle can reference one object twice through the memo (BINGET), and the decoder keeps
that sharing (linear size). Nest that 20 times and a 150-byte pickle decodes to a small
DAG whose *tree* has 2^20 leaves. Anything that renders such a value as text (Display,
Debug) walks the tree: 2^N work and output. N = 20 keeps each file quick to replay
(a few MB of text) while far over the harnesses' 16x-input bound; N = 40 would hang.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
N = 20
IDENT = b"d15700000000"


def frame(p):
    return struct.pack("!i", len(p)) + p


def bomb(n=N):
    """Pushes one value: t_n where t_0 = (1,) and t_{i+1} = (t_i, t_i), all memoized.

    Each level is 4 bytes: the previous tuple is on the stack, BINGET pushes it again from
    the memo, TUPLE2 pairs them, MEMOIZE records the pair.
    """
    b = b"K\x01\x85\x94"  # (1,), memo 0
    for i in range(n):
        b += b"h%c\x86\x94" % i  # (t_i, t_i), memo i + 1
    return b


def request(method, args_ops, kw_ops=b"}"):
    return (b"\x80\x04(\x8c" + bytes([len(IDENT)]) + IDENT
            + b"\x8c" + bytes([len(method)]) + method + args_ops + kw_ops + b"t.")


def main():
    out = {
        # put_many(<dict>): TypeError "put_many() takes a list or tuple of items, not {other}"
        ("dispatch", "dag-display-put_many"): frame(request(b"put_many", b"}(K\x00" + bomb() + b"u\x85")),
        # get(timeout=<tuple>): TypeError "timeout must be a number, not {other}"
        ("dispatch", "dag-display-get-timeout"): frame(request(b"get", b")", b"}(\x8c\x07timeout" + bomb() + b"u")),
        # get_many(<tuple>): ValueError "max_items must be a positive int, not {other}"
        ("dispatch", "dag-display-get_many"): frame(request(b"get_many", bomb() + b"\x85")),
        # ('#ERROR', builtins.ValueError(<tuple>, 0)): the client's Error::Remote message renders args
        ("pickle", "dag-display-error-reply"): (b"\x80\x04\x8c\x06#ERROR\x8c\x08builtins\x8c\x0aValueError\x93"
                                                 + bomb() + b"K\x00\x86R\x86."),
    }
    for (target, name), data in out.items():
        d = os.path.join(HERE, "regressions", target)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
        print(f"{target}/{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
