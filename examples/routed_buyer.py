#!/usr/bin/env python3
"""Sends each player's purchases to the node leading the player's shard, so that no node has to forward them:
the standard library only.

SHOPKEEP_NODES names every node (id=url,… e.g. 1=http://10.0.0.1:8080,2=http://10.0.0.2:8080,3=…) and
SHOPKEEP_SERVICE_TOKEN is the backend's token. Run as a script, it buys one ITEM for each PLAYER named and prints a
line per purchase: the player, the node it was sent to, and the answer's status:

    routed_buyer.py ITEM PLAYER...

A player's route (`GET /v1/cluster/route/{user_id}`: its shard, and that shard's leader) is asked once; the
leader of each shard is kept for ROUTE_SECONDS and asked again after. A stale route is never wrong, only slower:
every node takes every request and forwards it to the leader. A node that cannot be reached is dropped from
the route and the purchase is sent again elsewhere with the same Idempotency-Key, so it happens at most once.
"""
import json, os, sys, time, urllib.error, urllib.request, uuid

ROUTE_SECONDS = 5.0
MAX_PLAYERS_KEPT = 100_000  # a bound on the player → shard cache


class Router:
    def __init__(self, nodes, token):
        self.nodes = nodes  # node id → base URL
        self.token = token
        self.shard_of = {}  # player → shard (fixed for the life of the data directory)
        self.leader_of = {}  # shard → (node id, when learnt)

    def _call(self, url, method="GET", body=None, key=None):
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        if key:
            headers["Idempotency-Key"] = key
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, json.load(answer)
        except urllib.error.HTTPError as error:  # a 4xx/5xx still carries the contract's JSON body
            return error.code, json.load(error)

    def _learn(self, player):
        """Asks any reachable node where `player` lives; remembers the shard and its leader."""
        for node_id, base in self.nodes.items():
            try:
                status, route = self._call(f"{base}/v1/cluster/route/{player}")
            except OSError:
                continue
            if status == 200:
                if len(self.shard_of) >= MAX_PLAYERS_KEPT:
                    self.shard_of.clear()
                self.shard_of[player] = route["shard"]
                if route["leader"] is not None:
                    self.leader_of[route["shard"]] = (route["leader"], time.monotonic())
                return
        raise OSError("no node answered the route")

    def node_for(self, player):
        """The id of the node to send `player`'s writes to: its shard's leader when known, else any node."""
        shard = self.shard_of.get(player)
        known = self.leader_of.get(shard) if shard is not None else None
        if known is None or time.monotonic() - known[1] > ROUTE_SECONDS:
            self._learn(player)
            known = self.leader_of.get(self.shard_of[player])
        if known is not None and known[0] in self.nodes:
            return known[0]
        return next(iter(self.nodes))

    def post(self, player, path, body):
        """POSTs `body` for `player` to its leader; on an unreachable node, forgets it and tries the others."""
        key = str(uuid.uuid4())
        tried = set()
        while True:
            node_id = self.node_for(player)
            if node_id in tried:
                node_id = next((n for n in self.nodes if n not in tried), None)
                if node_id is None:
                    raise OSError(f"no node took the request for {player}")
            tried.add(node_id)
            try:
                status, answer = self._call(self.nodes[node_id] + path, "POST", body, key)
                return node_id, status, answer
            except OSError:
                self.leader_of.pop(self.shard_of.get(player), None)


def parse_nodes(text):
    return {int(i): url.rstrip("/") for i, url in (part.split("=", 1) for part in text.split(","))}


if __name__ == "__main__":
    router = Router(parse_nodes(os.environ["SHOPKEEP_NODES"]), os.environ["SHOPKEEP_SERVICE_TOKEN"])
    item, players = sys.argv[1], sys.argv[2:]
    for player in players:
        order = {"lines": [{"item_id": item, "quantity": 1}], "complete": True}
        node_id, status, _ = router.post(player, f"/v1/users/{player}/orders", order)
        print(player, node_id, status, flush=True)
