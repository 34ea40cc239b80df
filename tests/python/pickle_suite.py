# CPython's own pickle tests (Lib/test/pickletester.py, AbstractPickleTests), with every
# `loads` routed through distq-server (raw_items.py, prepended): the pickle is put as the
# raw item of a `put` request and loaded from the reply of the `get` that fetches it.
# Pickles without a protocol header (protocols 0 and 1) are loaded locally: distq
# carries protocols 2 and up. When distq refuses a pickle, CPython must refuse it too,
# and the test sees CPython's own exception. Exits 1 on any failure.
import unittest
from test import pickletester

counts = {'routed': 0, 'local': 0}

def route(buf, **kwds):
    buf = bytes(buf)
    # Out-of-band buffers (protocol 5's NEXT_BUFFER/READONLY_BUFFER) exist only between a
    # pickler with buffer_callback and an unpickler given buffers=; a manager connection
    # pickles in band, so a load given buffers is the one half of a test that stays local.
    if (buf[:1] != b'\x80' or len(buf) < 3 or buf[1] < 2 or buf[-1:] != b'.'
            or kwds.get('buffers') is not None):
        counts['local'] += 1
        return pickle.loads(buf, **kwds)
    refused = raw_put(buf)
    if refused is not None:
        pickle.loads(buf, **kwds)  # raises if CPython refuses it as well
        raise AssertionError('distq refused a pickle CPython loads: %s' % (refused,))
    counts['routed'] += 1
    return raw_get(**kwds)

class Routed(pickletester.AbstractPickleTests, unittest.TestCase):
    pickler = pickle.Pickler
    unpickler = pickle.Unpickler

    def dumps(self, arg, proto=None, **kwargs):
        return pickle.dumps(arg, proto, **kwargs)

    def loads(self, buf, **kwds):
        return route(buf, **kwds)

if __name__ == '__main__':
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(Routed)
    result = unittest.TextTestRunner(stream=sys.stdout, verbosity=1).run(suite)
    print('pickle suite: %d tests, %d failures, %d errors, %d skipped; %d pickles routed, %d local'
          % (result.testsRun, len(result.failures), len(result.errors), len(result.skipped),
             counts['routed'], counts['local']))
    sys.exit(0 if result.wasSuccessful() and counts['routed'] > 1000 else 1)
