# Queue semantics as a Python client sees them through distq-server. Queue 'bounded' must
# have been declared with maxsize 2 by the server.
import sys, time, queue
from multiprocessing.managers import BaseManager

class M(BaseManager):
    pass

for name in ('get_fifo', 'bounded', 'get_join'):
    M.register(name)
host, port, key = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
m = M(address=(host, port), authkey=key)
m.connect()

q = m.get_fifo()
for i in range(5):
    q.put(i)
assert q.qsize() == 5 and not q.empty() and not q.full()
assert [q.get() for _ in range(5)] == list(range(5)), 'FIFO order'
assert q.empty()

start = time.monotonic()
try:
    q.get(timeout=0.2)
    raise AssertionError('get on an empty queue returned')
except queue.Empty:
    took = time.monotonic() - start
assert 0.19 <= took < 1.5, 'Empty after %.3f s, expected ~0.2' % took
for call in (lambda: q.get(False), q.get_nowait, lambda: q.get(True, 0)):
    try:
        call()
        raise AssertionError('expected Empty')
    except queue.Empty:
        pass
try:
    q.get(timeout=-1)
    raise AssertionError('negative timeout accepted')
except ValueError as e:
    assert 'non-negative' in str(e), e

b = m.bounded()
b.put('a'); b.put('b', block=True, timeout=0.1)
assert b.full() and b.qsize() == 2
for call in (lambda: b.put('c', timeout=0.1), lambda: b.put_nowait('c'), lambda: b.put('c', False)):
    try:
        call()
        raise AssertionError('expected Full')
    except queue.Full:
        pass
assert b.get_nowait() == 'a' and b.get(timeout=1) == 'b'

j = m.get_join()
j.put(1); j.put(2)
assert j.get() == 1 and j.get() == 2
j.task_done(); j.task_done()
j.join()
try:
    j.task_done()
    raise AssertionError('extra task_done accepted')
except ValueError:
    pass
# Calls of the wrong shape raise what CPython's queue.Queue raises, in its words (3.10+
# name the class, 'Queue.get()'; 3.8 and 3.9 do not; 3.13+ add "Did you mean" hints,
# which distq does not).
import re
local = queue.Queue()
unhinted = lambda text: re.sub(r"\. Did you mean '[^']*'\?$", '', text)
for args, kwds in [((True, 1, 2), {}), ((), {'bogus': 1}), ((True,), {'block': 2}),
                   ((), {'timeout': 1, 'tiemout': 2})]:
    for name in ('get', 'put', 'put_nowait', 'get_nowait', 'qsize', 'empty', 'full',
                 'task_done', 'join'):
        want = got = None
        try:
            getattr(local, name)(*args, **kwds)
        except TypeError as e:
            want = unhinted(str(e))
        if want is None:
            continue  # a valid call (put(True, 1, 2) would store an item)
        try:
            getattr(q, name)(*args, **kwds)
        except TypeError as e:
            got = str(e) if sys.version_info >= (3, 10) else str(e).replace('Queue.', '', 1)
        assert got == want, (name, args, kwds, got, want)
for name, args, kwds in [('put', (), {}), ('put', (1, True, 1, 2), {}), ('put', (1,), {'item': 2})]:
    try:
        getattr(local, name)(*args, **kwds)
    except TypeError as e:
        want = str(e)
    try:
        getattr(q, name)(*args, **kwds)
        got = None
    except TypeError as e:
        got = str(e) if sys.version_info >= (3, 10) else str(e).replace('Queue.', '', 1)
    assert got == want, (name, args, kwds, got, want)
# distq's batching extensions, through the ordinary AutoProxy.
q.put_many(list(range(100)))
assert q.get_many(30) == list(range(30))
assert q.get_many(1000, timeout=0.5) == list(range(30, 100))
try:
    q.get_many(5, timeout=0.1)
    raise AssertionError('expected Empty')
except queue.Empty:
    pass
st = q.stats()
assert st['queues']['get_fifo']['puts'] == 105 and st['connections'] >= 1, st
print('semantics ok')
