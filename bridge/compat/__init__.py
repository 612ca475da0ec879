"""Every use of a library's internals (paho-mqtt, aiohttp) in one place, each guarded.

Each `Shim` (bridge/compat/shims.py) is checked once, at start-up (`shims.install()`), against the
installed library: when the internals it relies on are not the ones it was written against, it
stays off and the library's own behaviour is used instead (correct, only slower or leakier).
Nothing here is switched on by importing it or by constructing a client.
`tests/unit/test_compat.py` checks that every shim is on with the installed versions and that each
fallback works.

The shims, in `paho.py` and `aiohttp.py` (this package imports neither, so a process that needs
only one of the libraries loads only that one):
- `publish_decoder` (paho `_packet`): decode a large inbound PUBLISH with one copy of its payload
  instead of three (a 25 MiB file in base64 is a 33 MiB request);
- `out_packet_view` (paho `Client._out_packet`): send a large queued reply through a memoryview,
  so paho's per-write slicing copies nothing;
- `max_inflight` (paho `Client._max_inflight_messages`): apply the broker's Receive Maximum after
  CONNACK, which paho's public setter refuses once connected;
- `raw_topic` (paho `MQTTMessage._topic`): read a topic that is not valid UTF-8;
- `sock_close` (paho `Client._sock_close`): drop a dead socket without a DISCONNECT;
- `tls_tracking` (an `ssl.SSLContext` subclass paho wraps its socket with): close the socket of a
  failed TLS handshake, which paho leaves to the garbage collector;
- `lean_matcher` (paho `Client._on_message_filtered`): skip the topic match of every inbound
  message while no per-filter callback is set (paho builds a self-referencing closure for each
  match: a reference cycle per request that only the cyclic garbage collector frees);
- `read_buffer` (paho `Client._sock_recv`): read what the socket holds with one `recv` and hand
  paho its pieces, instead of a `recv` for the command byte, one for each byte of the remaining
  length, one for the rest of each packet and a last one that finds the socket empty (seven
  system calls for a realtime audio chunk and its PUBACK);
- `lean_properties` (paho `Properties.__init__`, `clear`): share the constant name and type tables
  among MQTT 5 `Properties` objects instead of building them anew for each (paho makes two to
  four per request: the inbound PUBLISH, our reply's PUBACK, its callback), and clear one by its
  instance dict instead of trying all 27 property names (for every inbound packet's properties);
- `lean_reason_codes` (paho `ReasonCode.__init__`): the same for `ReasonCode` (a copy of its name
  table and a search of it for every code; two per request, both for the PUBACK);
- `bytes_body` (aiohttp `Payload.__init__`): send a body over 1 MiB from memory without
  BytesPayload's ResourceWarning (a bridge holds its uploads in memory by design);
- `ssl_context` (aiohttp `connector._SSL_CONTEXT_VERIFIED`): the lean HTTP path's https
  connections use aiohttp's own verified TLS context, so both paths verify alike and the CA store
  is loaded once (another context costs 0.7 MiB).

Beside the shims, `optional.py` keeps packages the libraries load only when installed, and the
bridge never uses, out of a command-line process (rich, which structlog would load: 4.3 MiB;
frozenlist's C++ build, which loads libstdc++: 1.1 MiB).
"""
