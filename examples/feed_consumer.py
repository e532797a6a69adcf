#!/usr/bin/env python3
"""Reads shopkeep's event feed forever, keeping its place in a file: the standard library only.

SHOPKEEP_URL (default http://127.0.0.1:8080), SHOPKEEP_SERVICE_TOKEN, and the cursor file as the first
argument (default ./shop-events.cursor). Each event is handled before the cursor after it is stored, so a
crash repeats at most the last page: make handling idempotent by event_id.
"""
import json, os, sys, urllib.parse, urllib.request

base = os.environ.get("SHOPKEEP_URL", "http://127.0.0.1:8080")
token = os.environ["SHOPKEEP_SERVICE_TOKEN"]
cursor_file = sys.argv[1] if len(sys.argv) > 1 else "shop-events.cursor"

def handle(event):  # grant or take the item in game here
    print(event["type"], event["user_id"], event["event_id"], flush=True)

cursor = open(cursor_file).read().strip() if os.path.exists(cursor_file) else None
while True:
    query = {"limit": 500, "wait": 30, **({"after": cursor} if cursor else {})}
    request = urllib.request.Request(f"{base}/v1/events?{urllib.parse.urlencode(query)}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        page = json.load(answer)
    for event in page["events"]:
        handle(event)
    cursor = page["next_cursor"]
    with open(cursor_file + ".tmp", "w") as f:
        f.write(cursor)
    os.replace(cursor_file + ".tmp", cursor_file)
