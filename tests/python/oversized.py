# Issue 13: an item over the server's frame limit is refused with a RemoteError naming
# the limit, and the thread's cached connection stays usable for the next call.
# After one_queue.py; argv[5] is the server's --max-frame.
from multiprocessing.managers import RemoteError

limit = int(sys.argv[5])
q.put('small before')
try:
    q.put(b'x' * (2 * limit))
    raise AssertionError('an oversized put was accepted')
except RemoteError as e:
    text = str(e)
    assert 'exceeds the limit of %d bytes' % limit in text, text
    assert '--max-frame' in text, text
q.put('small after')  # same thread, same cached connection
assert q.get(timeout=1) == 'small before'
assert q.get(timeout=1) == 'small after'
assert q.empty()
print('refused and still connected', flush=True)
