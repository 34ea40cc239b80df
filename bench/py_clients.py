#!/usr/bin/env python3
"""Python side of distq's benchmark (benches/bench.rs drives it).

Plain `multiprocessing.managers` code, exactly what a user would write; nothing here is
tuned for distq. Every client mode prints one JSON object on stdout.

    py_clients.py server                       # a BaseManager server; prints its port
    py_clients.py roundtrip  PORT SECS         # put+get on one connection -> calls/s
    py_clients.py pipeline   PORT N W [BATCH]  # master + W worker processes -> tasks/s
    py_clients.py cold       PORT SAMPLES      # connect .. first reply, ms per sample
    py_clients.py big        PORT SAMPLES SIZE # put+get of a SIZE-byte item, ms per sample
"""
import json
import multiprocessing as mp
import queue
import sys
import time
from multiprocessing.managers import BaseManager

AUTHKEY = b'distq-bench'
NAMES = ['get_task_queue', 'get_result_queue', 'get_rt_queue', 'get_big_queue',
         'get_cold_queue']


class QueueManager(BaseManager):
    pass


def serve():
    queues = {name: queue.Queue() for name in NAMES}
    for name in NAMES:
        QueueManager.register(name, callable=lambda q=queues[name]: q)
    m = QueueManager(address=('127.0.0.1', 0), authkey=AUTHKEY)
    server = m.get_server()
    print(server.address[1], flush=True)
    server.serve_forever()


def connect(port):
    for name in NAMES:
        QueueManager.register(name)
    m = QueueManager(address=('127.0.0.1', port), authkey=AUTHKEY)
    m.connect()
    return m


def roundtrip(port, secs):
    q = connect(port).get_rt_queue()
    for i in range(200):  # warm-up: opens the method channel
        q.put(i)
        q.get(timeout=5)
    calls = 0
    t0 = time.perf_counter()
    deadline = t0 + secs
    while True:
        for i in range(100):
            q.put(i)
            q.get(timeout=5)
        calls += 200
        now = time.perf_counter()
        if now >= deadline:
            break
    return {'calls_per_s': calls / (now - t0)}


def worker(port, batch, ready, done):
    m = connect(port)
    tasks, results = m.get_task_queue(), m.get_result_queue()
    tasks.qsize()  # open both method channels before the clock starts
    results.qsize()
    ready.wait()
    while True:
        try:
            if batch:
                ns = tasks._callmethod('get_many', (batch,), {'timeout': 0.05})
                results._callmethod('put_many', (['%d * %d = %d' % (n, n, n * n) for n in ns],))
            else:
                n = tasks.get(timeout=0.05)
                results.put('%d * %d = %d' % (n, n, n * n))
        except queue.Empty:
            if done.is_set():
                return


def pipeline(port, n, w, batch):
    m = connect(port)
    tasks, results = m.get_task_queue(), m.get_result_queue()
    tasks.qsize()
    results.qsize()
    ready, done = mp.Barrier(w + 1), mp.Event()
    procs = [mp.Process(target=worker, args=(port, batch, ready, done), daemon=True)
             for _ in range(w)]
    for p in procs:
        p.start()
    ready.wait()
    t0 = time.perf_counter()
    if batch:
        for i in range(0, n, batch):
            tasks._callmethod('put_many', (list(range(i, min(n, i + batch))),))
        got = 0
        while got < n:
            got += len(results._callmethod('get_many', (batch,), {'timeout': 30}))
    else:
        for i in range(n):
            tasks.put(i)
        for _ in range(n):
            results.get(timeout=30)
    elapsed = time.perf_counter() - t0
    done.set()
    for p in procs:
        p.join(10)
    return {'tasks_per_s': n / elapsed}


def cold(port, samples):
    ms = []
    for i in range(samples):
        t0 = time.perf_counter()
        q = connect(port).get_cold_queue()
        q.put(i)
        ms.append((time.perf_counter() - t0) * 1000)
        q.get(timeout=5)
    return {'ms': ms}


def big(port, samples, size):
    q = connect(port).get_big_queue()
    item = bytes(size)
    q.put(b'')  # open the method channel
    q.get(timeout=5)
    ms = []
    for _ in range(samples):
        t0 = time.perf_counter()
        q.put(item)
        assert len(q.get(timeout=5)) == size
        ms.append((time.perf_counter() - t0) * 1000)
    return {'ms': ms}


def main():
    mode, args = sys.argv[1], [float(a) if '.' in a else int(a) for a in sys.argv[2:]]
    if mode == 'server':
        return serve()
    fn = {'roundtrip': roundtrip, 'pipeline': pipeline, 'cold': cold, 'big': big}[mode]
    if mode == 'pipeline' and len(args) == 3:
        args.append(0)
    print(json.dumps(fn(*args)), flush=True)


if __name__ == '__main__':
    mp.set_start_method('fork')
    main()
