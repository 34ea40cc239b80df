# The connection most scripts here start with: a BaseManager at argv[1]:argv[2] with the
# key argv[3], and `q`, a proxy of the queue registered as argv[4]. The tests prepend it.
import sys
from multiprocessing.managers import BaseManager

host, port, key, qname = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), sys.argv[4]

class _M(BaseManager):
    pass

_M.register(qname)
_m = _M(address=(host, port), authkey=key)
_m.connect()
q = getattr(_m, qname)()
