# The classic task_master.py, except that it binds port 0 and prints the address it got.
import random, time, queue, sys, multiprocessing
from multiprocessing.managers import BaseManager

authkey, ntasks = sys.argv[1].encode(), int(sys.argv[2])
if sys.version_info >= (3, 14):
    multiprocessing.set_start_method('fork')  # the registry's lambdas cannot be pickled

task_queue = queue.Queue()
result_queue = queue.Queue()

class QueueManager(BaseManager):
    pass

QueueManager.register('get_task_queue', callable=lambda: task_queue)
QueueManager.register('get_result_queue', callable=lambda: result_queue)
manager = QueueManager(address=('127.0.0.1', 0), authkey=authkey)
manager.start()
print('ADDRESS %s %d' % manager.address, flush=True)
task = manager.get_task_queue()
result = manager.get_result_queue()
for i in range(ntasks):
    n = random.randint(0, 10000)
    print('Put task %d...' % n)
    task.put(n)
print('Try get results...')
for i in range(ntasks):
    r = result.get(timeout=10)
    print('Result: %s' % r)
manager.shutdown()
print('master exit.')
