"""The harness ceiling: a trivial paho responder that stands where the bridge would.

Subscribes to `<prefix>/request/#` (QoS 1) and answers each request on the matching
`<prefix>/response/...` topic (QoS 1) with the envelope the bridge would send for the canned chat
completion, carrying the request's `transaction`. No HTTP, no validation: what is left is the cost
of the broker, the load generator and one paho client, which no bridge can beat.

Run as `python bench/echo.py --port P`; prints `ready` once subscribed, serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
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
    args = parser.parse_args()
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
        c.publish(response_head + rest, payload, qos=1)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    signal.signal(signal.SIGTERM, lambda *_: client.disconnect())
    client.connect("127.0.0.1", args.port, keepalive=60)
    client.loop_forever()


if __name__ == "__main__":
    main()
