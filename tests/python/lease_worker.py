# A Python worker that uses distq's leases through the ordinary AutoProxy: reserve a task,
# put its result, then ack. Killed at any moment, it loses no task.
import sys, time, queue
from multiprocessing.managers import BaseManager

class M(BaseManager):
    pass

M.register('get_task_queue')
M.register('get_result_queue')
host, port, key = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
m = M(address=(host, port), authkey=key)
m.connect()
task, result = m.get_task_queue(), m.get_result_queue()
print('ready', flush=True)
while True:
    try:
        lease, n = task.reserve(timeout=1)
    except queue.Empty:
        continue
    time.sleep(delay)
    result.put('%d * %d = %d' % (n, n, n * n))
    task.ack(lease)
