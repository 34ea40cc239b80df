# A BaseManager client with serializer='xmlrpclib', and the Python server it is compared
# with. Modes (argv[1]):
#   serve KEY                      a Python server with serializer='xmlrpclib' (prints ADDRESS)
#   check HOST PORT KEY            queue calls; one line per observation, for comparing servers
#   put|get HOST PORT KEY SER      items across serializers (SER: xmlrpclib or pickle)
#   shutdown HOST PORT KEY         ask the server to stop, as an xmlrpclib client
import sys, time, queue, datetime, types, multiprocessing
import xmlrpc.client
from multiprocessing import managers
from multiprocessing.managers import BaseManager


class M(BaseManager):
    pass


mode = sys.argv[1]
if mode == 'serve':
    if sys.version_info >= (3, 14):
        multiprocessing.set_start_method('fork')
    tasks, results = queue.Queue(), queue.Queue()
    M.register('get_task_queue', callable=lambda: tasks)
    M.register('get_result_queue', callable=lambda: results)
    m = M(address=('127.0.0.1', 0), authkey=sys.argv[2].encode(), serializer='xmlrpclib')
    server = m.get_server()
    print('ADDRESS %s %d' % server.address, flush=True)
    server.serve_forever()
    sys.exit(0)

M.register('get_task_queue')
M.register('get_result_queue')
host, port, key = sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
serializer = sys.argv[5] if len(sys.argv) > 5 else 'xmlrpclib'
m = M(address=(host, port), authkey=key, serializer=serializer)
m.connect()


def show(v):
    """A repr that names types and has no addresses, so two runs compare as text."""
    if isinstance(v, xmlrpc.client.Binary):
        return 'Binary(%r)' % v.data
    if isinstance(v, xmlrpc.client.DateTime):
        return 'DateTime(%r)' % v.value
    if isinstance(v, list):
        return '[%s]' % ', '.join(map(show, v))
    if isinstance(v, tuple):
        return '(%s)' % ', '.join(map(show, v))
    if isinstance(v, dict):
        return '{%s}' % ', '.join('%r: %s' % (k, show(x)) for k, x in v.items())
    return '%s %r' % (type(v).__name__, v)


def attempt(label, call):
    try:
        print(label, 'returned', show(call()))
    except managers.RemoteError:
        # The text is a server's traceback: file names and line numbers differ.
        print(label, 'raised RemoteError')
    except Exception as e:
        print(label, 'raised %s: %s' % (type(e).__name__, e))


if mode == 'check':
    q = m.get_task_queue()
    deep = 'bottom'
    for _ in range(50):
        deep = [deep]
    values = [
        0, 1, -5, 2**31 - 1, -2**31,
        'plain', 'non-ASCII é ☃ 𝄞', '<&> "quotes" \'apos\'', 'a]]>b',
        'cr\rlf\r\ncrlf\n', '\t tabs and  spaces ', '',
        1.5, 1e16, -0.0, 0.1, float('inf'), float('nan'), True, False, None,
        b'bytes\x00\xff', b'', bytearray(b'ba'), bytes(range(256)),
        [], [1, 'a', [2.5, None]], (1, 2), {}, {'k': 1, 'nested': {'x': [1, {'y': None}]}},
        {'<&>': 'escaped name'},
        datetime.datetime(2024, 1, 2, 3, 4, 5), xmlrpc.client.DateTime('20240102T03:04:05'),
        deep,
    ]
    for v in values:
        q.put(v)
        print('round trip', show(v), '->', show(q.get(timeout=5)))
    start = time.monotonic()
    attempt('get(timeout=0.1) on an empty queue', lambda: q.get(timeout=0.1))
    waited = time.monotonic() - start
    print('waited about the timeout', 0.09 <= waited < 2)
    attempt('get_nowait() on an empty queue', q.get_nowait)
    attempt('get(False) on an empty queue', lambda: q.get(False))
    for i in range(3):
        q.put(i)
    attempt('qsize', q.qsize)
    attempt('empty', q.empty)
    attempt('full', q.full)
    attempt('gets', lambda: [q.get() for _ in range(3)])
    attempt('empty', q.empty)
    # A request the server cannot read (expat refuses a control character), then a
    # method it does not have, then a call with a missing argument: the channel survives.
    attempt('put of a control character', lambda: q.put('\x01'))
    attempt('unknown method', lambda: q._callmethod('no_such_method'))
    attempt('put without an item', lambda: q._callmethod('put'))
    q.put('after the errors')
    attempt('get after the errors', q.get)
    # Two proxies for one queue.
    other = m.get_task_queue()
    other.put('via the second proxy')
    attempt('get via the first', q.get)
    print('checked')

# Items across serializers: what one kind of client puts, the other gets.
elif mode == 'put':
    r = m.get_result_queue()
    common = [1, 'é<&>', 1.5, True, None, b'by', [1, (2,)], {'k': [1]}]
    if serializer == 'xmlrpclib':
        items = common + [xmlrpc.client.DateTime('20240102T03:04:05')]
    else:
        items = common + [bytearray(b'ba'), 2**40, {1: 'int key'}, {1, 2},
                          types.SimpleNamespace(a=1), datetime.datetime(2024, 1, 2),
                          datetime.date(2024, 1, 2)]
    for item in items:
        r.put(item)
    print('put', len(items))

elif mode == 'get':
    r = m.get_result_queue()
    while True:
        try:
            print(show(r.get(timeout=0.5)))
        except managers.RemoteError as e:
            print('RemoteError', [l for l in str(e).splitlines() if l.strip('-').strip()][-1])
        except TypeError as e:
            # An xmlrpclib client's get() on an empty queue (see 'check').
            print('done')
            break
        except queue.Empty:
            print('done')
            break

elif mode == 'shutdown':
    conn = m._Client(m._address, authkey=m._authkey)
    try:
        managers.dispatch(conn, None, 'shutdown')
    finally:
        conn.close()
    print('shut down')
