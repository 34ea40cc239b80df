# Issue 13: "here is a queue to answer on". A producer puts a task carrying a
# manager.Queue() proxy and drops its own proxy at once; a consumer on another
# connection takes the task and answers on that queue. Python's server keeps the queue
# alive while the item refers to it; so must distq's.
import gc, sys, multiprocessing
from multiprocessing.managers import BaseManager

host, port, key = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
# A rebuilt proxy authenticates with the process's key.
multiprocessing.current_process().authkey = key

class M(BaseManager):
    pass

M.register('get_reply_task_queue')
M.register('Queue')

producer = M(address=(host, port), authkey=key)
producer.connect()
tasks = producer.get_reply_task_queue()
for i in range(3):
    answer_on = producer.Queue()
    tasks.put(('job %d' % i, answer_on))
    del answer_on  # the producer's decref: only the stored item refers to the queue now
gc.collect()

consumer = M(address=(host, port), authkey=key)
consumer.connect()
jobs = consumer.get_reply_task_queue()
for i in range(3):
    job, reply = jobs.get(timeout=5)
    reply.put('done: ' + job)
    print(reply.get(timeout=5))
print('answered', flush=True)
