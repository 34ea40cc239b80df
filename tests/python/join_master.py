# A Python master that hosts its queues and waits for the work with task_queue.join(),
# as Python users do; a worker must call task_done() for join() to return.
import sys, queue, threading
from multiprocessing.managers import BaseManager

authkey, n = sys.argv[1].encode(), int(sys.argv[2])
task_queue, result_queue = queue.Queue(), queue.Queue()

class QueueManager(BaseManager):
    pass

QueueManager.register('get_task_queue', callable=lambda: task_queue)
QueueManager.register('get_result_queue', callable=lambda: result_queue)
server = QueueManager(address=('127.0.0.1', 0), authkey=authkey).get_server()
threading.Thread(target=server.serve_forever, daemon=True).start()
for i in range(n):
    task_queue.put(i + 2)
print('ADDRESS %s %d' % server.address, flush=True)
joined = threading.Thread(target=task_queue.join, daemon=True)
joined.start()
joined.join(30)
print('joined' if not joined.is_alive() else 'join timed out', flush=True)
print('results %d' % result_queue.qsize(), flush=True)
