#!/usr/bin/env python3
"""Where one purchase's time goes, on one node, at one client.

    scripts/stage-breakdown.py [--bin target/release/shopkeep] [--seconds 10]

Starts a throwaway `shopkeep serve` (its own data dir and ports), buys one item in a loop over one
keep-alive connection (POST /v1/users/{id}/orders {"complete": true}, a fresh Idempotency-Key each),
then reads the server's own histograms from --metrics-listen and prints the mean of each stage:

    http_request_duration  the request as the server saw it (head to answer)
      raft_batch           from queueing the command to its reply (the batcher and openraft included)
        raft_proposal      from client_write to the applied reply (append, commit, apply)
          log_commit       one commit of the Raft log file (its fsync included)
          apply            one apply transaction of the shard (its commands, the marker, the commit)

and the server's CPU time per purchase. The stages nest: what a stage does not explain of its parent is
hops between threads and tasks. Python's client adds its own time to the client-side figures only.
Run it on a quiet machine; `perf record -g -p <pid>` on the server meanwhile gives the CPU profile.
"""
import argparse, http.client, json, os, re, shutil, socket, subprocess, tempfile, time, uuid


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def histogram_means(text):
    sums, counts = {}, {}
    for line in text.splitlines():
        m = re.match(r'^(\w+)_(sum|count)(\{.*\})? ([0-9.e+-]+)$', line)
        if not m:
            continue
        name, kind, labels, value = m.group(1), m.group(2), m.group(3) or '', float(m.group(4))
        if name == 'shopkeep_http_request_duration_seconds' and not (
                'method="POST"' in labels and 'route="/v1/users/{user_id}/orders"' in labels):
            continue
        table = sums if kind == 'sum' else counts
        table[name] = table.get(name, 0) + value
    return {name: (sums[name] / counts[name], counts[name]) for name in sums if counts.get(name)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--bin', default='target/release/shopkeep')
    parser.add_argument('--seconds', type=float, default=10)
    args = parser.parse_args()
    port, metrics_port = free_port(), free_port()
    data = tempfile.mkdtemp(prefix='stage-breakdown-')
    admin, service = 'a' * 40, 's' * 40
    env = dict(os.environ, SHOPKEEP_ADMIN_TOKEN=admin, SHOPKEEP_SERVICE_TOKEN=service,
               SHOPKEEP_PSP_SECRET='p' * 40)
    server = subprocess.Popen(
        [args.bin, 'serve', '--data-dir', data + '/data', '--listen', f'127.0.0.1:{port}',
         '--metrics-listen', f'127.0.0.1:{metrics_port}'],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        conn = None
        for _ in range(400):
            try:
                conn = http.client.HTTPConnection('127.0.0.1', port)
                conn.request('GET', '/readyz')
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.05)

        def call(method, path, token, body=None, key=None):
            headers = {'Authorization': 'Bearer ' + token, 'Content-Type': 'application/json'}
            if key:
                headers['Idempotency-Key'] = key
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers=headers)
            response = conn.getresponse()
            return response.status, response.read()

        for status, what in [
            (call('PUT', '/v1/items/gems', admin, {'name': 'Gems', 'kind': 'currency', 'price': '0.01'}), 'item'),
            (call('POST', '/v1/users', service, {'user_id': 'u1'}, 'user-u1'), 'user'),
            (call('POST', '/v1/users/u1/credits', service,
                  {'amount': '100000.00', 'external_ref': 'r1', 'source': 'card'}, 'credit-u1'), 'credit'),
        ]:
            assert status[0] in (200, 201), (what, status)
        cpu_before = cpu_seconds(server.pid)
        latencies = []
        end = time.time() + args.seconds
        while time.time() < end:
            started = time.perf_counter()
            status, body = call('POST', '/v1/users/u1/orders', service,
                                {'lines': [{'item_id': 'gems', 'quantity': 1}], 'complete': True},
                                str(uuid.uuid4()))
            latencies.append(time.perf_counter() - started)
            assert status == 201, (status, body)
        cpu = cpu_seconds(server.pid) - cpu_before
        latencies.sort()
        n = len(latencies)
        print(f'{n / args.seconds:.0f} purchases/s at 1 client; client-side p50 '
              f'{latencies[n // 2] * 1e3:.3f} ms, p99 {latencies[int(n * 0.99)] * 1e3:.3f} ms')
        print(f'server CPU {cpu / n * 1e3:.3f} ms per purchase')
        scrape = http.client.HTTPConnection('127.0.0.1', metrics_port)
        scrape.request('GET', '/metrics')
        means = histogram_means(scrape.getresponse().read().decode())
        for label, name in [
            ('http_request_duration', 'shopkeep_http_request_duration_seconds'),
            ('  raft_batch', 'shopkeep_raft_batch_seconds'),
            ('    raft_proposal', 'shopkeep_raft_proposal_seconds'),
            ('      log_commit', 'shopkeep_raft_log_commit_seconds'),
            ('      apply', 'shopkeep_apply_seconds'),
        ]:
            mean, count = means.get(name, (0.0, 0))
            print(f'{label:24s} mean {mean * 1e3:7.3f} ms  (n={count:.0f})')
        for label, name in [('log ops per commit', 'shopkeep_raft_log_ops_per_commit'),
                            ('commands per apply', 'shopkeep_apply_batch_size')]:
            mean, count = means.get(name, (0.0, 0))
            print(f'{label:24s} mean {mean:7.3f}     (n={count:.0f})')
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(data, ignore_errors=True)


def cpu_seconds(pid):
    fields = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


if __name__ == '__main__':
    main()
