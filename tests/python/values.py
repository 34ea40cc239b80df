# Puts (argv[4] == 'put') or fetches and checks (== 'check') a list of diverse values
# through the manager at argv[1]:argv[2], so that equality is judged by Python itself.
import sys, queue, dataclasses
from multiprocessing.managers import BaseManager

@dataclasses.dataclass
class Point:
    x: int
    y: str

def values():
    shared = [1, 2, 3]
    return [
        None, True, False, -1, 0, 255, 65536, 2**31, -2**31 - 1, 2**63 - 1, -2**63, 2**70, -2**100,
        2.25, float('inf'), -0.0, 'hällo', 'привіт', '', '😀', b'\x00\xff', b'', bytearray(b'ab'),
        (1, 'a'), (), (1,), (1, 2, 3, 4), [1, [2, [3]]], [], {'k': [1]}, {}, {1, 2}, set(),
        frozenset({3}), frozenset(), 'x' * 100_000, bytes(range(256)) * 4096, list(range(10_000)),
        {i: str(i) for i in range(1500)}, Point(3, 'p'), KeyError('missing'), ValueError('bad', 2),
        (shared, shared),
    ]

class M(BaseManager):
    pass

M.register('get_values_queue')
host, port, key, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), sys.argv[4]
m = M(address=(host, port), authkey=key)
m.connect()
q = m.get_values_queue()
expected = values()
if mode == 'put':
    for v in expected:
        q.put(v)
    print('put %d values' % len(expected))
    sys.exit(0)

failures = []
for i, want in enumerate(expected):
    got = q.get(timeout=5)
    if isinstance(want, BaseException):
        ok = type(got) is type(want) and got.args == want.args
    elif isinstance(want, float) and want == 0.0:
        ok = repr(got) == repr(want)
    else:
        ok = type(got) is type(want) and got == want
    if isinstance(want, tuple) and len(want) == 2 and isinstance(want[0], list):
        ok = ok and got[0] is got[1]  # shared references stay shared
    if not ok:
        failures.append('%d: want %r, got %r' % (i, repr(want)[:80], repr(got)[:80]))
try:
    q.get(timeout=0.1)
    failures.append('unexpected extra item')
except queue.Empty:
    pass
if failures:
    print('\n'.join(failures))
    sys.exit(1)
print('checked %d values' % len(expected))
