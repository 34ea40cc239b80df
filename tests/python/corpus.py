# A generated corpus of object graphs through distq-server (raw_items.py, prepended).
# argv[5] is 'put', 'check' or 'mutate', argv[6] the seed, argv[7] the number of graphs. 'put'
# pickles each graph at every protocol from 2 to HIGHEST (capped at 5) and puts the raw
# pickle; 'check', in another Python process (another version), rebuilds the same graphs
# from the seed, gets each item back and compares: equal values, the same types, the
# same sharing and the same cycles. Exits 1 on any difference. A mode ending in '+numpy'
# ('put+numpy', 'check+numpy') adds numpy arrays and scalars to the graphs; numpy must be
# importable then (.ci/run installs it in every Python).
import collections, dataclasses, random

@dataclasses.dataclass
class Point:
    x: object
    y: object

class Slotted:
    __slots__ = ('a', 'b')
    def __init__(self, a, b):
        self.a, self.b = a, b

class Reduced:
    """__reduce__ with state, list items and dict items."""
    def __init__(self, tag):
        self.tag, self.items, self.pairs, self.state = tag, [], {}, None
    def append(self, x):
        self.items.append(x)
    def extend(self, xs):
        self.items.extend(xs)
    def __setitem__(self, k, v):
        self.pairs[k] = v
    def __setstate__(self, state):
        self.state = state
    def __reduce__(self):
        return (Reduced, (self.tag,), self.state, iter(self.items), iter(self.pairs.items()))

class NewArgsEx:
    """Protocol 4's NEWOBJ_EX (protocols 2 and 3 fall back to copyreg.__newobj_ex__)."""
    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        self.args, self.kwargs = args, kwargs
        return self
    def __getnewargs_ex__(self):
        return self.args, self.kwargs

class MyList(list):
    pass

class MyDict(dict):
    pass

class MySet(set):
    pass

class MyTuple(tuple):
    pass

ATOMS = [
    lambda r: None, lambda r: r.random() < 0.5, lambda r: r.randrange(-300, 300),
    lambda r: r.randrange(-2**70, 2**70), lambda r: r.randrange(2**200),
    lambda r: r.choice([0.5, -0.0, 1e300, float('inf')]), lambda r: 'x' * r.randrange(5),
    lambda r: r.choice(['\ud800', 'a\udfffb', 'h\u00e4llo', '\U0001F600', '']),
    lambda r: bytes(r.randrange(256) for _ in range(r.randrange(4))),
    lambda r: bytearray(b'ab' * r.randrange(3)),
    lambda r: r.choice([1j, complex(2, -1)]),
]

NUMPY = sys.argv[5].endswith('+numpy')
if NUMPY:
    import numpy as np
    DTYPES = ['i1', '<i4', '>i8', 'u2', '<f4', '>f8', 'c16', '?', 'U3', 'S2', 'M8[D]', 'm8[s]',
              [('a', '<i4'), ('b', '>f8')]]

    def ndarray(r):
        dtype = np.dtype(r.choice(DTYPES))
        shape = r.choice([(), (0,), (r.randrange(1, 6),), (2, 3), (2, 1, 2)])
        raw = bytes(r.randrange(256) for _ in range(dtype.itemsize * int(np.prod(shape))))
        a = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
        if dtype.kind == 'U':
            a = np.array([''.join(chr(r.randrange(32, 0xD000)) for _ in range(r.randrange(4)))
                          for _ in range(a.size)], dtype=dtype).reshape(shape)
        elif dtype.kind == 'M' or dtype.kind == 'm':
            np.remainder(a.view('i8'), 10**6, out=a.view('i8'))  # real dates and spans, no NaT
        how = r.randrange(4)
        if how == 1 and a.ndim >= 2:
            a = np.asfortranarray(a)
        elif how == 2 and a.ndim >= 1:
            a = a[::2]  # not contiguous: pickled as a C-ordered copy
        elif how == 3:
            a.flags.writeable = False
        return a

    NUMPY_SCALARS = [lambda r: np.float64(r.random()), lambda r: np.int32(r.randrange(-9, 9)),
                     lambda r: np.bool_(r.random() < 0.5), lambda r: np.complex64(1 - 2j),
                     lambda r: np.datetime64('2021-03-04'), lambda r: np.uint8(200)]
    ATOMS = ATOMS + [ndarray] * 6 + NUMPY_SCALARS

def atom(r):
    return r.choice(ATOMS)(r)

def key(r):
    # Hashable, and equal only to itself across processes.
    return r.choice([lambda: r.randrange(1000), lambda: 'k%d' % r.randrange(1000),
                     lambda: (r.randrange(9), 'k'), lambda: frozenset({r.randrange(9)})])()

def graph(r, depth=0, pool=None):
    """A random graph; `pool` holds mutable nodes to share and to close cycles with."""
    pool = [] if pool is None else pool
    if pool and r.random() < 0.15:
        return r.choice(pool)
    if depth >= 4 or r.random() < 0.3:
        return atom(r)
    kind = r.randrange(18 if NUMPY else 17)
    n = r.randrange(4)
    sub = lambda: graph(r, depth + 1, pool)
    if kind == 0:
        node = [];  pool.append(node); node.extend(sub() for _ in range(n))
    elif kind == 1:
        node = MyList(); pool.append(node); node.extend(sub() for _ in range(n)); node.attr = sub()
    elif kind == 2:
        node = {}; pool.append(node); node.update((key(r), sub()) for _ in range(n))
    elif kind == 3:
        node = MyDict(); pool.append(node); node.update((key(r), sub()) for _ in range(n))
    elif kind == 4:
        node = tuple(sub() for _ in range(n))
    elif kind == 5:
        node = MyTuple(sub() for _ in range(n))
    elif kind == 6:
        node = {key(r) for _ in range(n)}
    elif kind == 7:
        node = MySet(key(r) for _ in range(n))
    elif kind == 8:
        node = frozenset(key(r) for _ in range(n))
    elif kind == 9:
        node = collections.defaultdict(list); pool.append(node)
        node.update((key(r), sub()) for _ in range(n))
    elif kind == 10:
        node = collections.OrderedDict(); pool.append(node)
        node.update((key(r), sub()) for _ in range(n))
    elif kind == 11:
        node = collections.deque(maxlen=r.choice([None, 5])); pool.append(node)
        node.extend(sub() for _ in range(n))
    elif kind == 12:
        node = collections.Counter({key(r): r.randrange(5) for _ in range(n)})
    elif kind == 13:
        node = Point(None, None); pool.append(node); node.x, node.y = sub(), sub()
    elif kind == 14:
        node = Slotted(None, None); pool.append(node); node.a, node.b = sub(), sub()
    elif kind == 15:
        node = Reduced(r.randrange(9)); pool.append(node)
        node.extend(sub() for _ in range(n))
        for _ in range(r.randrange(3)):
            node[key(r)] = sub()
        node.state = r.choice([None, {'s': sub()}, (sub(),)])
    elif kind == 16:
        node = NewArgsEx(*(sub() for _ in range(n)), kw=sub())
    else:
        # An object array holds references like a list: sharing and cycles through it.
        node = np.empty(r.choice([(n,), (n, 2)]), dtype=object); pool.append(node)
        for at in np.ndindex(node.shape):
            node[at] = sub()
    return node

def same(a, b, seen):
    """Structural isomorphism: same types, equal atoms, and a one-to-one correspondence
    of container identities (so sharing and cycles match)."""
    if type(a) is not type(b):
        return False
    if NUMPY and isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, float):
        return repr(a) == repr(b)
    if isinstance(a, (type(None), bool, int, complex, str, bytes, frozenset)):
        return a == b
    if type(a) is tuple and not a:
        return True  # pickle writes every empty tuple as the one singleton ()
    if id(a) in seen:
        return seen[id(a)] is b
    if any(s is b for s in seen.values()):
        return False
    seen[id(a)] = b
    if isinstance(a, bytearray):
        return a == b
    if NUMPY and isinstance(a, np.ndarray):
        fortran = lambda x: x.flags.f_contiguous and not x.flags.c_contiguous
        if (a.dtype != b.dtype or a.shape != b.shape or fortran(a) != fortran(b)
                or a.flags.writeable != b.flags.writeable):  # bytes vs bytearray at protocol 5
            return False
        if a.dtype == object:
            return all(same(a[at], b[at], seen) for at in np.ndindex(a.shape))
        return a.tobytes() == b.tobytes()
    attrs = lambda: same(vars(a), vars(b), seen) if hasattr(a, '__dict__') else True
    if isinstance(a, set):
        return a == b and attrs()
    if isinstance(a, dict):
        # Pickle keeps a dict's order, so keys pair up in order (keys may be objects
        # that hash by identity).
        ka, kb = list(a), list(b)
        if len(ka) != len(kb):
            return False
        if isinstance(a, collections.defaultdict) and a.default_factory is not b.default_factory:
            return False
        return (all(same(x, y, seen) and same(a[x], b[y], seen) for x, y in zip(ka, kb))
                and attrs())
    if isinstance(a, (list, tuple, collections.deque)):
        if isinstance(a, collections.deque) and a.maxlen != b.maxlen:
            return False
        if len(a) != len(b) or not all(same(x, y, seen) for x, y in zip(a, b)):
            return False
        return attrs()
    if isinstance(a, Slotted):
        return same(a.a, b.a, seen) and same(a.b, b.b, seen)
    return same(vars(a), vars(b), seen)

HIGHEST = min(pickle.HIGHEST_PROTOCOL, 5)
mode, seed, count = sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
rng = random.Random(seed)
graphs = [graph(rng) for _ in range(count)]
protocols = [int(p) for p in sys.argv[8].split(',')] if len(sys.argv) > 8 else range(2, HIGHEST + 1)
if mode.startswith('put'):
    n = 0
    for g in graphs:
        for proto in protocols:
            refused = raw_put(pickle.dumps(g, proto))
            if refused is not None:
                print('graph %d protocol %d refused: %s' % (n, proto, str(refused)[-300:]))
                sys.exit(1)
        n += 1
    print('put %d graphs x %d protocols' % (count, len(protocols)))
    sys.exit(0)

# The comparison can fail: sharing and cycles count, not just equality.
_c = [[]]; _c.append(_c[0]); _r = []; _r.append(_r)
assert not same([[], []], _c, {}) and not same(_r, [[]], {}) and same(_r, _r, {})
if NUMPY:
    _a = np.arange(4).reshape(2, 2); _b = _a.copy(); _b[1, 1] = 9
    _o = np.empty(1, dtype=object); _o[0] = _o
    assert (not same(_a, _b, {}) and not same([_a, _a], [_a, _a.copy()], {})
            and not same(_a, np.asfortranarray(_a), {}) and not same(_a, _a.astype('>i8'), {})
            and same(_o, pickle.loads(pickle.dumps(_o, 2)), {}) and not same(_o, np.array([_o]), {}))
class _Known(pickle.Unpickler):
    """Resolves only what the corpus uses, so a mutated name cannot reach anything else."""
    def find_class(self, module, name):
        if module in ('builtins', 'collections', 'copyreg', '__main__', '_codecs', '__builtin__',
                      'copy_reg', '_collections'):
            return super().find_class(module, name)
        raise pickle.UnpicklingError('not in the corpus: %s.%s' % (module, name))

def equal(a, b):
    """`same`, for mutants too: they can build objects the corpus never makes."""
    try:
        return same(a, b, {})
    except Exception:
        try:
            return pickle.dumps(a, 4) == pickle.dumps(b, 4)
        except Exception:
            return type(a) is type(b)

if mode == 'mutate':
    # A mutated LONG_BINPUT index makes CPython size its memo to it: with the address
    # space capped that is a MemoryError (a refusal), not the machine's memory.
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    # Differential: every mutated request that CPython reads as a put of one item must
    # come back through distq as the same graph (so distq refuses only what CPython
    # refuses), and a refusal never ends the connection.
    import io
    loaded = refused_both = 0
    failures = []
    for i, g in enumerate(graphs):
        for proto in protocols:
            clean = pickle.dumps(g, proto)
            for _ in range(8):
                m = bytearray(clean)
                for _ in range(rng.randrange(1, 4)):
                    if len(m) < 5:
                        break
                    at = rng.randrange(2, len(m) - 1)
                    what = rng.randrange(3)
                    if what == 0:
                        m[at] = rng.randrange(256)
                    elif what == 1:
                        del m[at]
                    else:
                        m.insert(at, rng.randrange(256))
                m = bytes(m)
                # CPython's verdict on the request as a Python server would read it.
                try:
                    request = _Known(io.BytesIO(envelope(m))).load()
                    ok = (type(request) is tuple and len(request) == 4 and request[:2] == (ident, 'put')
                          and type(request[2]) is tuple and len(request[2]) == 1)
                    want = request[2][0] if ok else None
                except Exception:
                    ok = False
                refused = raw_put(m)
                if refused is None:
                    try:
                        got = raw_get()
                    except Exception as e:
                        got = e
                    if ok and not equal(want, got):
                        failures.append('graph %d proto %d mutant %s: want %r, got %r'
                                        % (i, proto, m.hex(), repr(want)[:100], repr(got)[:100]))
                    loaded += ok
                elif ok:
                    failures.append('graph %d proto %d mutant %s: CPython loads it, distq refused: %s'
                                    % (i, proto, m.hex(), str(refused)[-200:]))
                else:
                    refused_both += 1
    for f in failures[:10]:
        print(f)
    print('mutants: %d loaded by CPython and carried, %d refused by both, %d differ'
          % (loaded, refused_both, len(failures)))
    sys.exit(1 if failures else 0)

failures = []
for i, g in enumerate(graphs):
    for proto in protocols:
        got = raw_get()
        # numpy's own round trip decides some details (a read-only array comes back
        # writable below protocol 5): compare with what CPython's pickle alone gives.
        want = pickle.loads(pickle.dumps(g, proto)) if NUMPY else g
        if not same(want, got, {}):
            failures.append('graph %d protocol %d: want %r, got %r'
                            % (i, proto, repr(g)[:200], repr(got)[:200]))
for f in failures[:10]:
    print(f)
print('checked %d graphs x %d protocols, %d differ' % (count, len(protocols), len(failures)))
sys.exit(1 if failures else 0)
