# Leases, dead-lettering and queue shutdown as a Python client sees them through
# distq-server (started with max_deliveries=2).
import sys, queue
from multiprocessing.managers import BaseManager

class M(BaseManager):
    pass

for name in ('get_jobs', 'get_jobs.dead', 'get_closing', 'get_answers'):
    M.register(name)
host, port, key = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
m = M(address=(host, port), authkey=key)
m.connect()
jobs = m.get_jobs()
jobs.put('a'); jobs.put('b')
lease, item = jobs.reserve(timeout=1)
assert item == 'a', item
assert jobs.qsize() == 1
jobs.release(lease)
lease, item = jobs.reserve(timeout=1)
assert item == 'a', 'released items go back to the head'
jobs.touch(lease)
jobs.ack(lease)
try:
    jobs.ack(lease)
    raise AssertionError('double ack accepted')
except ValueError as e:
    assert 'unknown lease' in str(e), e
# 'b' fails twice: the second release sends it to the dead-letter queue.
for _ in range(2):
    lease, item = jobs.reserve(timeout=1)
    assert item == 'b'
    jobs.release(lease)
assert jobs.empty()
assert getattr(m, 'get_jobs.dead')().get(timeout=1) == 'b'
# ack_put: the result and the ack in one call; nothing is stored for a lease that is gone.
jobs.put('c')
lease, item = jobs.reserve(timeout=1)
jobs.ack_put(lease, {'done': item, 'shared': [item, item]}, 'get_answers')
answers = m.get_answers()
got = answers.get(timeout=1)
assert got == {'done': 'c', 'shared': ['c', 'c']}, got
try:
    jobs.ack_put(lease, 'stale', 'get_answers')
    raise AssertionError('ack_put with a finished lease accepted')
except ValueError as e:
    assert 'unknown lease' in str(e), e
assert answers.empty(), 'a refused ack_put stored its item'
# reserve_many / ack_put_many: a prefetch and its results, two round trips for a batch;
# at most half of what waits goes to one caller, so others still find work.
jobs.put_many(list(range(10)))
batch = jobs.reserve_many(16, timeout=1)
assert [item for _, item in batch] == [0, 1, 2, 3, 4], batch
rest = jobs.reserve_many(16, timeout=1)
assert len(rest) == 3, rest
jobs.ack_put_many([l for l, _ in batch], [i * i for _, i in batch], 'get_answers')
assert answers.get_many(10, timeout=1) == [0, 1, 4, 9, 16]
try:
    jobs.ack_put_many([batch[0][0], rest[0][0]], ['stale', 'fresh'], 'get_answers')
    raise AssertionError('ack_put_many with a finished lease accepted')
except ValueError as e:
    assert 'unknown lease' in str(e), e
assert answers.empty(), 'a refused ack_put_many stored its items'
for lease, _ in rest:
    jobs.release(lease)
while not jobs.empty():
    jobs.get(timeout=1)

closing = m.get_closing()
closing.put(1)
closing.shutdown()
ShutDown = getattr(queue, 'ShutDown', None)
try:
    closing.put(2)
    raise AssertionError('put after shutdown accepted')
except Exception as e:
    # Python >= 3.13 raises queue.ShutDown; older ones fail to unpickle it, naming it.
    assert (ShutDown and isinstance(e, ShutDown)) or 'ShutDown' in repr(e), repr(e)
assert closing.get(timeout=1) == 1
try:
    closing.get(timeout=1)
    raise AssertionError('get on a drained shut-down queue returned')
except Exception as e:
    assert (ShutDown and isinstance(e, ShutDown)) or 'ShutDown' in repr(e), repr(e)
print('leases ok')
