# Issue 16: the server's memory budget (--max-memory) as a Python client sees it:
# queue.Full naming the limit, blocking puts time out, gets keep working and free it.
# After one_queue.py; argv[5] is the server's --max-memory.
import queue

limit = int(sys.argv[5])
q.put(b'x' * (limit * 6 // 10))
for put in (lambda: q.put_nowait(b'y' * (limit // 2)), lambda: q.put(b'y' * (limit // 2), timeout=0.2)):
    try:
        put()
        raise AssertionError('a put over the memory budget was accepted')
    except queue.Full as e:
        assert '%d bytes, --max-memory' % limit in str(e), repr(e)
memory = q.stats()['memory']
assert memory['limit'] == limit and memory['used'] > limit // 2, memory
assert len(q.get(timeout=1)) == limit * 6 // 10   # gets still work, and free the budget
q.put_nowait(b'y' * (limit // 2))
print('budget kept', flush=True)
