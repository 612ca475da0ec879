"""The harness ceiling: a trivial paho responder that stands where the bridge would.

Subscribes to `<prefix>/request/#` (QoS 1) and answers each request on the matching
`<prefix>/response/...` topic (QoS 1) with the envelope the bridge would send for the canned chat
completion, carrying the request's `transaction`. No HTTP, no validation: what is left is the cost
of the broker, the load generator and one paho client, which no bridge can beat.

Run as `python bench/echo.py --port P`; prints `ready` once subscribed, serves until SIGTERM.
With `--delay-ms D` each answer leaves D ms after its request arrived (one timer thread): the
ceiling of the harness for the 200 ms upstream runs.
"""

from __future__ import annotations

import argparse
import heapq
import signal
import sys
import threading
import time
from typing import Any

import orjson
import paho.mqtt.client as paho
from common import CHAT_COMPLETION, PREFIX, make_client
from paho.mqtt.subscribeoptions import SubscribeOptions

DATA = orjson.dumps(CHAT_COMPLETION)


def main() -> None:
    """Connect, subscribe, answer every request until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefix", default=PREFIX)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    delay_s = args.delay_ms / 1000
    request_head = f"{args.prefix}/request/"
    response_head = f"{args.prefix}/response/"
    client = make_client("bench-echo")

    def on_connect(c: paho.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        c.subscribe(f"{request_head}#", options=SubscribeOptions(qos=1))

    def on_subscribe(c: paho.Client, u: Any, mid: int, reasons: Any, props: Any) -> None:
        sys.stdout.write("ready\n")
        sys.stdout.flush()

    def on_message(c: paho.Client, u: Any, msg: paho.MQTTMessage) -> None:
        rest = msg.topic[len(request_head) :]
        method = rest.partition("/")[0]
        try:
            transaction = orjson.loads(msg.payload).get("transaction")
        except (orjson.JSONDecodeError, AttributeError):
            transaction = None
        payload = b"".join(
            (
                b'{"status":"ok","method":',
                orjson.dumps(method),
                b',"transaction":',
                orjson.dumps(transaction),
                b',"data":',
                DATA,
                b"}",
            )
        )
        if delay_s:
            later.put(time.monotonic() + delay_s, response_head + rest, payload)
        else:
            c.publish(response_head + rest, payload, qos=1)

    later = Later(client)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    signal.signal(signal.SIGTERM, lambda *_: client.disconnect())
    client.connect("127.0.0.1", args.port, keepalive=60)
    client.loop_forever()


class Later:
    """Publishes each queued answer when it is due, from one thread."""

    def __init__(self, client: paho.Client) -> None:
        self.client = client
        self.due: list[tuple[float, int, str, bytes]] = []
        self.ready = threading.Condition()
        self.seq = 0
        threading.Thread(target=self._run, name="later", daemon=True).start()

    def put(self, when: float, topic: str, payload: bytes) -> None:
        with self.ready:
            self.seq += 1
            heapq.heappush(self.due, (when, self.seq, topic, payload))
            self.ready.notify()

    def _run(self) -> None:
        while True:
            with self.ready:
                while not self.due or self.due[0][0] > time.monotonic():
                    wait = self.due[0][0] - time.monotonic() if self.due else None
                    self.ready.wait(wait)
                _, _, topic, payload = heapq.heappop(self.due)
            self.client.publish(topic, payload, qos=1)


if __name__ == "__main__":
    main()
