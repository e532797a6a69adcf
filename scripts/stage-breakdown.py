#!/usr/bin/env python3
"""Where one purchase's time goes, on one node or three, at one client (or more).

    scripts/stage-breakdown.py [--bin target/release/shopkeep] [--seconds 10] [--nodes 1|3] [--clients N]

Starts a throwaway `shopkeep serve` (its own data dir and ports), or with --nodes 3 a 3-node cluster on
loopback, and buys one item in a loop over one keep-alive connection to node 1 (POST /v1/users/{id}/orders {"complete": true}, a fresh Idempotency-Key each),
then reads the server's own histograms from --metrics-listen and prints the mean of each stage:

    http_request_duration  the request as the server saw it (head to answer)
      raft_batch           from queueing the command to its reply (the batcher and openraft included)
        raft_proposal      from client_write to the applied reply (append, commit, apply)
          log_commit       one commit of the Raft log file (its fsync included)
          apply            one apply transaction of the shard (its commands, the marker, the commit)

and the server's CPU time per purchase. With --nodes 3 it adds the node-to-node calls (forwarded writes,
appends, heartbeats) as the caller timed them and as the callee spent answering them: the difference is the
transport. With --nodes 3 it does so twice: for a player whose shard node 1
leads, then for one whose shard another node leads (node 1 forwards the batch to that leader, whose
histograms hold the proposal); the histograms are summed over the three nodes. The stages nest: what a stage does not explain of its parent is
hops between threads and tasks. Python's client adds its own time to the client-side figures only.

With --clients N (N > 1), N threads each buy over their own keep-alive connection, spread round-robin over
the nodes as behind a load balancer, each for players of its own: the means then show how commands share a
log entry and an apply transaction under load (Python's client tops out at a few thousand requests/s).
Run it on a quiet machine; `perf record -g -p <pid>` on the server meanwhile gives the CPU profile.
"""
import argparse, http.client, json, os, re, shutil, socket, subprocess, tempfile, time, uuid


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def histogram_sums(text):
    """(sum, count) of each histogram family (the POST orders route alone of the HTTP durations)."""
    sums, counts = {}, {}
    for line in text.splitlines():
        m = re.match(r'^(\w+)_(sum|count)(\{.*\})? ([0-9.e+-]+)$', line)
        if not m:
            continue
        name, kind, labels, value = m.group(1), m.group(2), m.group(3) or '', float(m.group(4))
        if name == 'shopkeep_http_request_duration_seconds' and not (
                'method="POST"' in labels and 'route="/v1/users/{user_id}/orders"' in labels):
            continue
        if name in ('shopkeep_node_call_seconds', 'shopkeep_node_serve_seconds'):
            call = re.search(r'call="(\w+)"', labels)
            name = f'{name}:{call.group(1) if call else "?"}'
        table = sums if kind == 'sum' else counts
        table[name] = table.get(name, 0) + value
    return {name: (sums[name], counts.get(name, 0.0)) for name in sums}


def start_nodes(args, data, env):
    """The servers, their client and metrics ports."""
    ids = list(range(1, args.nodes + 1))
    ports = {i: (free_port(), free_port(), free_port()) for i in ids}
    peers = ','.join(f'{i}=127.0.0.1:{ports[i][0]}' for i in ids)
    servers = []
    for i in ids:
        command = [args.bin, 'serve', '--data-dir', f'{data}/node-{i}', '--listen', f'127.0.0.1:{ports[i][0]}',
                   '--metrics-listen', f'127.0.0.1:{ports[i][1]}']
        if args.nodes > 1:
            command += ['--node-id', str(i), '--peers', peers]
        servers.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
    return servers, [ports[i][0] for i in ids], [ports[i][1] for i in ids]


def wait_ready(port):
    for _ in range(600):
        try:
            conn = http.client.HTTPConnection('127.0.0.1', port, timeout=2)
            conn.request('GET', '/readyz')
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                return conn
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f'node on port {port} never became ready')


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--bin', default='target/release/shopkeep')
    parser.add_argument('--seconds', type=float, default=10)
    parser.add_argument('--nodes', type=int, default=1, choices=[1, 3])
    parser.add_argument('--clients', type=int, default=1)
    args = parser.parse_args()
    data = tempfile.mkdtemp(prefix='stage-breakdown-')
    admin, service = 'a' * 40, 's' * 40
    env = dict(os.environ, SHOPKEEP_ADMIN_TOKEN=admin, SHOPKEEP_SERVICE_TOKEN=service,
               SHOPKEEP_PSP_SECRET='p' * 40, SHOPKEEP_CLUSTER_SECRET='c' * 40)
    servers, ports, metrics_ports = start_nodes(args, data, env)
    try:
        for port in ports:
            conn = wait_ready(port)

        call = connect_caller(ports[0])

        status = call('PUT', '/v1/items/gems', admin, {'name': 'Gems', 'kind': 'currency', 'price': '0.01'})
        assert status[0] in (200, 201), status
        if args.clients > 1:
            return under_load(args, call, service, servers, ports, metrics_ports)
        players = pick_players(args.nodes, call, admin)
        for case, user in players:
            for status in [call('POST', '/v1/users', service, {'user_id': user}, f'user-{user}'),
                           call('POST', f'/v1/users/{user}/credits', service,
                                {'amount': '100000.00', 'external_ref': f'r-{user}', 'source': 'card'},
                                f'credit-{user}')]:
                assert status[0] in (200, 201), status
            before = scrape_all(metrics_ports)
            cpu_before = sum(cpu_seconds(s.pid) for s in servers)
            latencies = buy(call, service, user, args.seconds)
            cpu = sum(cpu_seconds(s.pid) for s in servers) - cpu_before
            report(case, latencies, args.seconds, cpu, before, scrape_all(metrics_ports))
    finally:
        for server in servers:
            server.kill()
            server.wait()
        shutil.rmtree(data, ignore_errors=True)


def connect_caller(port):
    """call(method, path, token, body=None, key=None) -> (status, body), over one keep-alive connection."""
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)

    def call(method, path, token, body=None, key=None):
        headers = {'Authorization': 'Bearer ' + token, 'Content-Type': 'application/json'}
        if key:
            headers['Idempotency-Key'] = key
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    return call


def under_load(args, call, service, servers, ports, metrics_ports):
    """--clients N: N threads, each with its own connection and players, for --seconds."""
    import threading
    players = [f'load-{n}' for n in range(args.clients * 4)]
    for user in players:
        for status in [call('POST', '/v1/users', service, {'user_id': user}, f'user-{user}'),
                       call('POST', f'/v1/users/{user}/credits', service,
                            {'amount': '100000.00', 'external_ref': f'r-{user}', 'source': 'card'},
                            f'credit-{user}')]:
            assert status[0] in (200, 201), status
    results = [[] for _ in range(args.clients)]

    def client(n):
        caller = connect_caller(ports[n % len(ports)])
        own = players[n::args.clients]
        end = time.time() + args.seconds
        i = 0
        while time.time() < end:
            user = own[i % len(own)]
            i += 1
            started = time.perf_counter()
            status, body = caller('POST', f'/v1/users/{user}/orders', service,
                                  {'lines': [{'item_id': 'gems', 'quantity': 1}], 'complete': True},
                                  str(uuid.uuid4()))
            results[n].append(time.perf_counter() - started)
            assert status == 201, (status, body)

    before = scrape_all(metrics_ports)
    cpu_before = sum(cpu_seconds(s.pid) for s in servers)
    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cpu = sum(cpu_seconds(s.pid) for s in servers) - cpu_before
    latencies = sorted(x for r in results for x in r)
    report(f'{args.clients} clients over {args.nodes} node(s)', latencies, args.seconds, cpu, before,
           scrape_all(metrics_ports))


def pick_players(nodes, call, admin):
    """One player per case: on one node just one; on three, one led by node 1 and one led elsewhere."""
    if nodes == 1:
        return [('one node', 'u1')]
    wanted = {'shard led by node 1 (local)': lambda leader: leader == 1,
              'shard led by another node (forwarded)': lambda leader: leader not in (None, 1)}
    found = {}
    deadline = time.time() + 30
    while len(found) < len(wanted) and time.time() < deadline:
        for n in range(1, 200):
            status, body = call('GET', f'/v1/cluster/route/p{n}', admin)
            leader = json.loads(body).get('leader') if status == 200 else None
            for case, test in wanted.items():
                if case not in found and test(leader):
                    found[case] = f'p{n}'
        time.sleep(0.2)
    return [(case, found[case]) for case in wanted if case in found]


def buy(call, service, user, seconds):
    latencies = []
    end = time.time() + seconds
    while time.time() < end:
        started = time.perf_counter()
        status, body = call('POST', f'/v1/users/{user}/orders', service,
                            {'lines': [{'item_id': 'gems', 'quantity': 1}], 'complete': True},
                            str(uuid.uuid4()))
        latencies.append(time.perf_counter() - started)
        assert status == 201, (status, body)
    latencies.sort()
    return latencies


def scrape_all(metrics_ports):
    """Sum and count of each histogram, summed over the nodes."""
    totals = {}
    for port in metrics_ports:
        scrape = http.client.HTTPConnection('127.0.0.1', port)
        scrape.request('GET', '/metrics')
        for name, (total, count) in histogram_sums(scrape.getresponse().read().decode()).items():
            old = totals.get(name, (0.0, 0.0))
            totals[name] = (old[0] + total, old[1] + count)
    return totals


def report(case, latencies, seconds, cpu, before, after):
    n = len(latencies)
    print(f'== {case}: {n / seconds:.0f} purchases/s; client-side p50 '
          f'{latencies[n // 2] * 1e3:.3f} ms, p99 {latencies[int(n * 0.99)] * 1e3:.3f} ms')
    print(f'server CPU (all nodes) {cpu / n * 1e3:.3f} ms per purchase')

    def mean(name):
        total, count = after.get(name, (0.0, 0.0))
        total0, count0 = before.get(name, (0.0, 0.0))
        return ((total - total0) / (count - count0), count - count0) if count > count0 else (0.0, 0)

    for label, name, unit in [
        ('http_request_duration', 'shopkeep_http_request_duration_seconds', 1e3),
        ('  raft_batch', 'shopkeep_raft_batch_seconds', 1e3),
        ('    raft_proposal', 'shopkeep_raft_proposal_seconds', 1e3),
        ('      log_commit', 'shopkeep_raft_log_commit_seconds', 1e3),
        ('      apply', 'shopkeep_apply_seconds', 1e3),
        ('log ops per commit', 'shopkeep_raft_log_ops_per_commit', 1),
        ('commands per apply', 'shopkeep_apply_batch_size', 1),
        ('entries per apply', 'shopkeep_raft_apply_entries', 1),
    ] + [row for kind in ('write', 'append', 'heartbeat') for row in [
        (f'node call: {kind}', f'shopkeep_node_call_seconds:{kind}', 1e3),
        ('  answering it', f'shopkeep_node_serve_seconds:{kind}', 1e3)]]:
        value, count = mean(name)
        print(f'{label:24s} mean {value * unit:7.3f}{" ms" if unit > 1 else "   "}  (n={count:.0f})')


def cpu_seconds(pid):
    fields = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


if __name__ == '__main__':
    main()
