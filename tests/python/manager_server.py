# A Python BaseManager server with shared queues, for testing distq's client against it.
import sys, queue, multiprocessing
from multiprocessing.managers import BaseManager

authkey = sys.argv[1].encode()
if sys.version_info >= (3, 14):
    multiprocessing.set_start_method('fork')
task_queue = queue.Queue()
result_queue = queue.Queue()
bounded = queue.Queue(maxsize=1)

class QueueManager(BaseManager):
    pass

QueueManager.register('get_task_queue', callable=lambda: task_queue)
QueueManager.register('get_result_queue', callable=lambda: result_queue)
QueueManager.register('get_bounded_queue', callable=lambda: bounded)
m = QueueManager(address=('127.0.0.1', 0), authkey=authkey)
server = m.get_server()
print('ADDRESS %s %d' % server.address, flush=True)
server.serve_forever()
