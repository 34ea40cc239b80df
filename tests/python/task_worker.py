# The classic task_worker.py, unchanged except that address, key and rounds come from argv.
import sys, time, queue
from multiprocessing.managers import BaseManager

class QueueManager(BaseManager):
    pass

QueueManager.register('get_task_queue')
QueueManager.register('get_result_queue')

server_addr, port, authkey, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), int(sys.argv[4])
print('Connect to server %s...' % server_addr)
m = QueueManager(address=(server_addr, port), authkey=authkey)
m.connect()
task = m.get_task_queue()
result = m.get_result_queue()
for i in range(rounds):
    try:
        n = task.get(timeout=1)
        print('run task %d * %d...' % (n, n))
        r = '%d * %d = %d' % (n, n, n*n)
        result.put(r)
    except queue.Empty:
        print('task queue is empty.')
print('worker exit.')
