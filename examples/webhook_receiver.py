#!/usr/bin/env python3
"""Receives shopkeep's webhooks and checks their Standard Webhooks signature: the standard library only.

WEBHOOK_SECRET is the `secret` PUT /v1/webhooks/{name} answered (whsec_...); PORT (default 9000).
Answers 2xx only to a valid, fresh signature; anything else is refused and shopkeep retries it.
"""
import base64, hashlib, hmac, json, os, time
from http.server import BaseHTTPRequestHandler, HTTPServer

key = base64.b64decode(os.environ["WEBHOOK_SECRET"].removeprefix("whsec_"))
seen = set()  # delivery is at least once: deduplicate by webhook-id (keep this in your database)

def valid(headers, body):
    msg_id, stamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "0")
    if not stamp.isdigit() or abs(time.time() - int(stamp)) > 300:
        return False
    mac = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    expected = base64.b64encode(mac).decode()
    return any(hmac.compare_digest(expected, sig.removeprefix("v1,"))
               for sig in headers.get("webhook-signature", "").split())

class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if not valid(self.headers, body):
            self.send_response(401); self.end_headers(); return
        event = json.loads(body)
        if event["event_id"] not in seen:
            seen.add(event["event_id"])
            print(event["type"], event["user_id"], event["shard"], event["seq"], flush=True)
        self.send_response(204); self.end_headers()

HTTPServer(("127.0.0.1", int(os.environ.get("PORT", "9000"))), Receiver).serve_forever()
