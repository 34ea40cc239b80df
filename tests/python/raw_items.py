# Raw items: put a pickle's own opcodes as the item of a hand-built request, and get
# the item back, through the queue `q` of one_queue.py. Shared by the pickle suite and
# the corpus; the test prepends both to each.
import pickle
from multiprocessing.connection import Client

ident = q._id
conn = Client((host, port), authkey=key)
conn.send((None, 'accept_connection', ('raw items',), {}))
assert conn.recv() == ('#RETURN', None)

def _sbu(s):
    b = s.encode()
    return b'\x8c' + bytes([len(b)]) + b

_GET = pickle.dumps((ident, 'get', (), {'timeout': 5}), 4)

def envelope(buf):
    """The `put` request carrying the pickle `buf` (protocol 2 or higher, as produced by
    pickle.dumps) as its item: its opcodes, under its own protocol, with nothing
    memoized before them."""
    return b'\x80' + buf[1:2] + b'(' + _sbu(ident) + _sbu('put') + buf[2:-1] + b'\x85}t.'

def raw_put(buf):
    """Puts `envelope(buf)`. Returns None, or the server's error reply."""
    conn.send_bytes(envelope(buf))
    kind, result = pickle.loads(conn.recv_bytes())
    return None if kind == '#RETURN' else result

def raw_get(**kwds):
    conn.send_bytes(_GET)
    kind, result = pickle.loads(conn.recv_bytes(), **kwds)
    if kind != '#RETURN':
        raise pickle.UnpicklingError('distq get failed: %s' % (result,))
    return result

