# SyncManager-style clients (what multiprocessing.Manager() returns) against distq-server,
# in the manner of CPython's own _TestQueue: every Queue() call makes a new queue, which
# lives as long as some proxy refers to it. Run as: sync_manager.py HOST PORT KEY
import gc, multiprocessing, queue, sys, time
from multiprocessing.managers import SyncManager, RemoteError, dispatch

host, port, key = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
ctx = multiprocessing.get_context('fork')

def manager():
    m = SyncManager(address=(host, port), authkey=key)
    m.connect()
    return m

m = manager()
start_objects = m._number_of_objects()

def test_put_get_maxsize():
    q = m.Queue(maxsize=6)
    q2 = m.Queue(6)  # positional maxsize, and a different queue
    assert q._token.id != q2._token.id
    for i in range(6):
        q.put(i)
    assert q.full() and q.qsize() == 6 and q2.empty()
    for put in (lambda: q.put(7, block=False), lambda: q.put_nowait(7), lambda: q.put(7, timeout=0.1)):
        try:
            put()
            raise AssertionError('put on a full queue succeeded')
        except queue.Full:
            pass
    assert [q.get() for _ in range(6)] == list(range(6))
    try:
        q.get(timeout=0.1)
        raise AssertionError('get on an empty queue returned')
    except queue.Empty:
        pass
    unbounded = m.Queue(-1)
    for i in range(100):
        unbounded.put(i)
    assert unbounded.qsize() == 100

def _consume(jq, n):
    for _ in range(n):
        jq.get()
        jq.task_done()

def test_joinable_queue_across_processes():
    jq = m.JoinableQueue()
    for i in range(20):
        jq.put(i)
    workers = [ctx.Process(target=_consume, args=(jq, 10)) for _ in range(2)]
    for w in workers:
        w.start()
    jq.join()  # returns once both children have called task_done 10 times
    for w in workers:
        w.join(10)
        assert w.exitcode == 0, w.exitcode
    try:
        jq.task_done()
        raise AssertionError('extra task_done accepted')
    except ValueError:
        pass

def _produce(q):
    for i in range(5):
        q.put(('child', i))

def test_proxy_inherited_by_forked_child():
    q = m.Queue()
    p = ctx.Process(target=_produce, args=(q,))
    p.start()
    got = [q.get(timeout=10) for _ in range(5)]
    p.join(10)
    assert p.exitcode == 0
    assert got == [('child', i) for i in range(5)], got

def _churn(seed):
    mm = manager()
    for i in range(20):
        q = mm.Queue(maxsize=i % 3)
        q.put((seed, i))
        assert q.get(timeout=5) == (seed, i)
        del q
    gc.collect()

def test_many_processes_create_use_and_drop_queues():
    procs = [ctx.Process(target=_churn, args=(s,)) for s in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0, p.exitcode

def test_dropped_queue_is_gone():
    q = m.Queue()
    ident = q._token.id
    del q
    gc.collect()
    conn = m._Client((host, port), authkey=key)
    try:
        dispatch(conn, None, 'incref', (ident,))
        raise AssertionError('incref of a freed queue succeeded')
    except RemoteError as e:
        assert 'KeyError' in str(e), e
    finally:
        conn.close()

def test_non_queue_typeids_are_refused():
    for make in (m.dict, m.list, m.Lock, m.Event, m.Namespace):
        try:
            make()
            raise AssertionError('%s() gave an object' % make.__name__)
        except RemoteError as e:
            assert 'queues only' in str(e), e

for name, test in list(globals().items()):
    if name.startswith('test_'):
        test()
        print('ok', name, flush=True)

gc.collect()
deadline = time.monotonic() + 10
while m._number_of_objects() != start_objects and time.monotonic() < deadline:
    time.sleep(0.05)
assert m._number_of_objects() == start_objects, (m._number_of_objects(), start_objects, m._debug_info())
print('sync manager ok')
