#!/usr/bin/env python3
"""Writes seed inputs for the distq fuzz targets into fuzz/corpus/<target>/.

Seeds are real protocol bytes: frames, handshake transcripts and pickles made by this
Python's own pickle module (protocols 2-5), and request sequences as a Python client sends
them. Run from anywhere:  python3 fuzz/seeds.py
The corpus directory is not committed (only the minimized fuzz/regressions/ is).
"""

import collections
import datetime
import decimal
import hashlib
import hmac
import os
import pickle
import queue
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
KEY = b"abc"
IDENT = "d15700000000"          # the harness's unbounded queue "q"
BOUNDED = "d15700000010"        # the harness's queue "bounded" (maxsize 2)


def frame(payload):
    return struct.pack("!i", len(payload)) + payload


def long_frame(payload):
    return struct.pack("!iQ", -1, len(payload)) + payload


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y


class Slotted:
    __slots__ = ("a", "b")

    def __init__(self):
        self.a, self.b = 1, [2]


Pair = collections.namedtuple("Pair", "left right")


def objects():
    shared = [1, 2, 3]
    big = b"\xab" * 300
    return {
        "none": None, "true": True, "false": False,
        "ints": [0, 1, -1, 255, 256, 65535, 65536, 2**31 - 1, -2**31, 2**63 - 1, -2**63,
                 2**64, -2**64 - 1, 2**1000, -(2**300)],
        "floats": [0.0, -0.0, 1.5, 1e300, float("inf"), float("-inf"), float("nan"), 2.5e-308],
        "strs": ["", "a", "hello world", "é", "\u20ac" * 10, "\U0001F600", "x" * 300,
                 "line\nbreak\t'\"\\"],
        "bytes": [b"", b"\x00", b"abc" * 100, big, bytearray(b"ba"), bytearray()],
        "containers": ((), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), [], {}, set(), frozenset(),
                       {1, 2, 3}, frozenset({"a"}), {"k": [1, {"n": (2,)}]}),
        "shared": [shared, shared, (shared,), {"s": shared}],
        "shared_big": [big, big, big],
        "nested": [[[[[[[[[[1]]]]]]]]]],
        "dict_many": {i: str(i) for i in range(1100)},
        "list_many": list(range(1100)),
        "set_many": set(range(1100)),
        "exceptions": [KeyError("missing"), ValueError("bad", 3), queue.Empty(), queue.Full(),
                       AttributeError("no attribute 'zzz' here")],
        "instances": [Point(1, "two"), Pair(1, 2), Slotted(), collections.OrderedDict(a=1),
                      datetime.datetime(2024, 5, 6, 7, 8, 9, 10), datetime.date(2020, 1, 2),
                      decimal.Decimal("1.25"), complex(1, 2), range(3), slice(1, 2)],
        "globals": [len, dict, KeyError, Point],
        "task": ("n * n", 2201),
        "result": "2201 * 2201 = 4844401",
    }


def pickles():
    out = {}
    for name, obj in objects().items():
        for proto in (2, 3, 4, 5):
            try:
                out[f"{name}-p{proto}"] = pickle.dumps(obj, proto)
            except Exception as e:  # noqa: BLE001 - some objects need newer protocols
                print(f"skip {name} p{proto}: {e}", file=sys.stderr)
    # Python 2 style names (protocol 2 maps __builtin__ to builtins).
    out["py2-set"] = b"\x80\x02c__builtin__\nset\nq\x00]q\x01(K\x01K\x02e\x85q\x02Rq\x03."
    out["py2-bytes"] = b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcq\x01X\x06\x00\x00\x00latin1q\x02\x86q\x03Rq\x04."
    # Memo games: a 1-byte-of-input reference chain, and a shared list referenced often.
    out["memo-chain"] = (b"\x80\x04]\x94" + b"(h\x00h\x00l\x94" * 20 + b".")
    out["memo-refs"] = b"\x80\x04](K\x01e\x94(" + b"h\x00" * 50 + b"t."
    return out


def requests():
    """(name, request tuple) pairs, as a Python client sends them."""
    return [
        ("create", (None, "create", ("get_task_queue",), {})),
        ("create-bounded", (None, "create", ("bounded",), {})),
        ("incref", (None, "incref", (IDENT,), {})),
        ("decref", (None, "decref", (IDENT,), {})),
        ("dummy", (None, "dummy", (), {})),
        ("accept", (None, "accept_connection", ("QueueProxy",), {})),
        ("shutdown", (None, "shutdown", (), {})),
        ("get_methods", (None, "get_methods", (IDENT,), {})),
        ("debug_info", (None, "debug_info", (), {})),
        ("number_of_objects", (None, "number_of_objects", (), {})),
        ("unknown", (None, "frobnicate", (), {})),
        ("put-int", (IDENT, "put", (2201,), {})),
        ("put-str", (IDENT, "put", ("2201 * 2201 = 4844401",), {})),
        ("put-kw", (IDENT, "put", (), {"item": [1, 2], "block": False})),
        ("put-timeout", (IDENT, "put", (1, True, 0.5), {})),
        ("put-bounded", (BOUNDED, "put", ((1, 2),), {})),
        ("put-nowait", (IDENT, "put_nowait", ({"a": 1},), {})),
        ("put-many", (IDENT, "put_many", ([1, "two", 3.0, None],), {})),
        ("put-many-bounded", (BOUNDED, "put_many", ((1, 2, 3),), {"block": False})),
        ("get", (IDENT, "get", (), {})),
        ("get-timeout", (IDENT, "get", (), {"timeout": 1})),
        ("get-nowait", (IDENT, "get_nowait", (), {})),
        ("get-noblock", (IDENT, "get", (False,), {})),
        ("get-neg", (IDENT, "get", (), {"timeout": -1.0})),
        ("get-many", (IDENT, "get_many", (5,), {})),
        ("get-many-kw", (IDENT, "get_many", (), {"max_items": 3, "timeout": 0.1})),
        ("get-many-zero", (IDENT, "get_many", (0,), {})),
        ("qsize", (IDENT, "qsize", (), {})),
        ("empty", (IDENT, "empty", (), {})),
        ("full", (BOUNDED, "full", (), {})),
        ("task-done", (IDENT, "task_done", (), {})),
        ("join", (IDENT, "join", (), {})),
        ("repr", (IDENT, "__repr__", (), {})),
        ("str", (IDENT, "__str__", (), {})),
        ("getvalue", (IDENT, "#GETVALUE", (), {})),
        ("bad-method", (IDENT, "zzz", (), {})),
        ("bad-ident", ("nope", "get", (), {})),
        ("dup-arg", (IDENT, "get", (False,), {"block": False})),
        ("extra-kw", (IDENT, "qsize", (), {"bogus": 1})),
        ("bad-timeout", (IDENT, "get", (), {"timeout": "soon"})),
        ("put-many-bad", (IDENT, "put_many", ({"not": "a list"},), {})),
        ("exception-item", (IDENT, "put", (KeyError("x"),), {})),
        ("instance-item", (IDENT, "put", (Point(1, 2),), {})),
    ]


def dispatch_seeds():
    reqs = dict(requests())
    out = {}
    for proto in (2, 4, 5):
        for name, req in reqs.items():
            try:
                out[f"{name}-p{proto}"] = frame(pickle.dumps(req, proto))
            except Exception as e:  # noqa: BLE001
                print(f"skip request {name} p{proto}: {e}", file=sys.stderr)
    conversations = {
        "conv-master": ["create", "accept", "put-int", "put-str", "qsize", "get-timeout",
                        "get", "get-nowait", "decref"],
        "conv-batch": ["put-many", "get-many", "get-many-kw", "get-many-zero", "empty"],
        "conv-bounded": ["put-bounded", "put-bounded", "put-bounded", "full",
                         "put-many-bounded", "get-noblock"],
        "conv-tasks": ["put-int", "get", "task-done", "task-done", "join"],
        "conv-errors": ["bad-ident", "bad-method", "dup-arg", "extra-kw", "bad-timeout",
                        "get-neg", "put-many-bad", "getvalue", "repr"],
        "conv-objects": ["exception-item", "instance-item", "get-many", "get"],
        "conv-public": ["dummy", "number_of_objects", "debug_info", "incref", "decref",
                        "get_methods", "unknown", "shutdown"],
    }
    for name, steps in conversations.items():
        out[name] = b"".join(frame(pickle.dumps(reqs[s], 4)) for s in steps)
    # A frame that does not hold a pickle, then a good request (the server keeps going).
    out["garbage-then-request"] = frame(b"\x80\x04garbage") + frame(pickle.dumps(reqs["qsize"], 4))
    return out


def mac(digest, msg):
    return hmac.new(KEY, msg, digest).digest()


def handshake_seeds():
    body_modern = b"{sha256}" + bytes(range(32))
    body_legacy = bytes(range(20))
    modern = b"#CHALLENGE#" + body_modern
    legacy = b"#CHALLENGE#" + body_legacy
    ok, fail = b"#WELCOME#", b"#FAILURE#"
    answer_modern = b"{sha256}" + mac("sha256", body_modern)
    answer_legacy = mac("md5", body_legacy)
    client = {  # the peer is a server: challenge, verdict, answer, verdict
        "modern": [modern, ok, answer_modern, ok],
        "legacy": [legacy, ok, answer_legacy, ok],
        "md5-prefixed": [b"#CHALLENGE#{md5}" + bytes(30), ok, answer_modern],
        "sha384": [b"#CHALLENGE#{sha384}" + bytes(30), ok],
        "rejected": [modern, fail],
        "short": [b"#CHALLENGE#" + bytes(19)],
        "unsupported": [b"#CHALLENGE#{sha3_256}" + bytes(40), ok],
        "no-prefix": [ok],
    }
    server = {  # the peer is a client: answer, challenge, verdict
        "modern": [answer_modern, modern, ok],
        "legacy": [answer_legacy, legacy, ok],
        "empty-answer": [b"", modern, ok],
        "wrong-digest": [b"{sha512}" + bytes(64), modern, ok],
        "brace": [b"{sha256", legacy, fail],
        "long": [b"x" * 256, modern],
    }
    out = {}
    for role, table in (("handshake_client", client), ("handshake_server", server)):
        for name, frames in table.items():
            stream = b"".join(frame(f) for f in frames)
            for shape in (0x00, 0x01, 0x07, 0x40):
                out[(role, f"{name}-{shape:02x}")] = bytes([shape]) + stream
        out[(role, "too-long")] = b"\x00" + frame(b"#" * 300)
        out[(role, "negative")] = b"\x00" + struct.pack("!i", -2)
        out[(role, "escaped")] = b"\x00" + long_frame(modern)
    return out


def frame_seeds():
    out = {}
    payloads = [b"", b"hello", bytes(300), pickle.dumps(("#RETURN", None), 4)]
    for shape in (0x00, 0x01, 0x03, 0x40, 0x80, 0xC1):
        for i, p in enumerate(payloads):
            for second in (0, 1):
                data = frame(p) + frame(b"x" * second)
                out[f"short-{shape:02x}-{i}-{second}"] = bytes([shape]) + data
        out[f"long-{shape:02x}"] = bytes([shape]) + long_frame(b"hello") + frame(b"!")
    out["negative"] = b"\x00" + struct.pack("!i", -5)
    out["min"] = b"\x00" + struct.pack("!i", -2**31)
    out["huge-long"] = b"\x80" + struct.pack("!iQ", -1, 2**64 - 1)
    out["over-handshake"] = b"\x00" + struct.pack("!i", 257) + bytes(257)
    out["truncated"] = b"\x00\x00\x00\x00\x05hel"
    return out


def main():
    for name, data in pickles().items():
        write("pickle", name, data)
    for (name, req) in requests():
        write("pickle", f"request-{name}", pickle.dumps(req, 4))
    for reply in [("#RETURN", None), ("#RETURN", 42), ("#ERROR", queue.Empty()),
                  ("#ERROR", KeyError("missing")), ("#TRACEBACK", "Traceback ...\nKeyError: 'x'\n"),
                  ("#UNSERIALIZABLE", "TypeError"), ("#PROXY", (("get", "put"), "token")),
                  ("#ERROR", ValueError(1, [2, 3], {"k": None})), ("#BOGUS", 1)]:
        digest = hashlib.sha1(repr(reply).encode()).hexdigest()[:8]
        write("pickle", f"reply-{reply[0][1:].lower()}-{digest}", pickle.dumps(reply, 4))
    for name, data in dispatch_seeds().items():
        write("dispatch", name, data)
    for (role, name), data in handshake_seeds().items():
        write(role, name, data)
    for name, data in frame_seeds().items():
        write("frame", name, data)


if __name__ == "__main__":
    main()
