#!/usr/bin/env python3
# Measures write unavailability after SIGKILL of a shard leader, on a local 3-node release cluster with
# default raft timings. Usage: cargo build --release && python3 benches/failover.py target/release/shopkeep 10
import json, os, shutil, signal, subprocess, sys, tempfile, time, urllib.request, uuid, threading

BIN = sys.argv[1]; ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
PORTS = {1: 7201, 2: 7202, 3: 7203}
PEERS = ",".join(f"{i}=127.0.0.1:{p}" for i, p in PORTS.items())
ENV = dict(os.environ, SHOPKEEP_CLUSTER_SECRET="failover-cluster-secret-0123456789abcdef", SHOPKEEP_ADMIN_TOKEN="failover-admin-token-0123456789abcdef", SHOPKEEP_SERVICE_TOKEN="failover-service-token-0123456789abcdef", RUST_LOG="warn")
root = tempfile.mkdtemp(prefix="failover-")
procs = {}

def start(i):
    procs[i] = subprocess.Popen([BIN, "serve", "--node-id", str(i), "--listen", f"127.0.0.1:{PORTS[i]}",
        "--data-dir", f"{root}/d{i}", "--peers", PEERS], env=ENV, stdout=subprocess.DEVNULL,
        stderr=open(f"{root}/n{i}.log", "a"))

def req(i, method, path, body=None, token=ENV["SHOPKEEP_SERVICE_TOKEN"], key=None, timeout=15):
    data = json.dumps(body).encode() if body is not None else None
    r = urllib.request.Request(f"http://127.0.0.1:{PORTS[i]}{path}", data=data, method=method)
    r.add_header("Authorization", f"Bearer {token}")
    if key: r.add_header("Idempotency-Key", key)
    try:
        with urllib.request.urlopen(r, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except Exception as e:
        return 0, str(e)

def ready(i):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{PORTS[i]}/readyz", timeout=1) as r:
            return r.status == 200
    except Exception:
        return False

for i in PORTS: start(i)
while not all(ready(i) for i in PORTS): time.sleep(0.05)
req(1, "PUT", "/v1/items/gems", {"name": "Gems", "kind": "currency", "price": "0.01"}, token=ENV["SHOPKEEP_ADMIN_TOKEN"])
gaps = []
for rnd in range(ROUNDS):
    user = f"u{rnd}"
    req(1, "POST", "/v1/users", {"user_id": user}, key=f"user-{user}")
    req(1, "POST", f"/v1/users/{user}/credits", {"amount": "1000.00", "external_ref": f"ref-{user}"}, key=f"c-{user}")
    _, route = req(1, "GET", f"/v1/cluster/route/{user}", token=ENV["SHOPKEEP_ADMIN_TOKEN"])
    leader = route["leader"]
    # Ask the supposed leader itself: after restarts a follower's view may lag.
    _, view = req(leader, "GET", "/v1/cluster", token=ENV["SHOPKEEP_ADMIN_TOKEN"])
    assert view["shards"][route["shard"]]["role"] == "leader", view["shards"][route["shard"]]
    via = [i for i in PORTS if i != leader][0]
    stop = False; oks = []
    def loop():
        while not stop:
            st, _ = req(via, "POST", f"/v1/users/{user}/orders", {"lines": [{"item_id": "gems", "quantity": 1}], "complete": True}, key=str(uuid.uuid4()))
            if st == 201: oks.append(time.monotonic())
    t = threading.Thread(target=loop); t.start()
    time.sleep(1.0)
    kill_at = time.monotonic(); procs[leader].send_signal(signal.SIGKILL); procs[leader].wait()
    elected = None
    while elected is None and time.monotonic() - kill_at < 30:
        _, v = req(via, "GET", "/v1/cluster", token=ENV["SHOPKEEP_ADMIN_TOKEN"], timeout=2)
        l = v["shards"][route["shard"]]["leader"] if isinstance(v, dict) else None
        if l is not None and l != leader: elected = (time.monotonic() - kill_at) * 1000
        else: time.sleep(0.01)
    # Wait until writes have flowed again for a while, then take the longest silence around the kill.
    while sum(1 for x in oks if x > kill_at + 0.2) < 20 and time.monotonic() - kill_at < 30: time.sleep(0.01)
    time.sleep(0.5); stop = True; t.join()
    window = sorted(x for x in oks if x > kill_at - 0.5)
    gaps.append(max(b - a for a, b in zip(window, window[1:])) * 1000)
    print(f"round {rnd}: killed node {leader} (leader of shard {route['shard']}), writes via node {via}: no write acknowledged for {gaps[-1]:.0f} ms; node {via} saw a new leader after {elected:.0f} ms", flush=True)
    start(leader)
    while not all(ready(i) for i in PORTS): time.sleep(0.05)
    time.sleep(1.0)
gaps.sort()
print(f"failover gaps ms: min {gaps[0]:.0f}, median {gaps[len(gaps)//2]:.0f}, max {gaps[-1]:.0f} over {len(gaps)} kills")
for p in procs.values():
    p.kill(); p.wait()
shutil.rmtree(root, ignore_errors=True)
