"""openai_mqtt: one action, `openai_mqtt.call`, that sends a request through openai-mqtt-bridge
and returns its reply, so a script needs no publish-and-wait YAML.

It subscribes once to `<prefix>/response/+/ha_call/#` and proves the subscription live (a probe
it publishes there must come back) before any call is sent; every call registers its transaction
before publishing, so no reply can arrive unawaited, however fast it comes.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import voluptuous as vol
from homeassistant.components import mqtt
from homeassistant.core import (
    HomeAssistant,
    ServiceCall,
    ServiceResponse,
    SupportsResponse,
    callback,
)
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import config_validation as cv
from homeassistant.helpers.typing import ConfigType

DOMAIN = "openai_mqtt"
SUFFIX = "ha_call"  # not under ha/: the example packages' reply sensor does not see these
READY_TIMEOUT = 60.0

CONFIG_SCHEMA = vol.Schema(
    {
        vol.Optional(DOMAIN, default={}): vol.Schema(
            {vol.Optional("topic_prefix", default="openai"): cv.string}
        )
    },
    extra=vol.ALLOW_EXTRA,
)
CALL_SCHEMA = vol.Schema(
    {
        vol.Required("method"): vol.All(cv.string, vol.Match(r"^[A-Za-z][A-Za-z0-9]*$")),
        vol.Optional("request", default={}): dict,
        vol.Optional("timeout", default=90): vol.All(vol.Coerce(float), vol.Range(min=0.1)),
    }
)


async def async_setup(hass: HomeAssistant, config: ConfigType) -> bool:
    """Subscribe to the replies (in the background) and register `openai_mqtt.call`."""
    prefix: str = config.get(DOMAIN, {}).get("topic_prefix", "openai")
    pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
    ready = asyncio.Event()
    probe = f"probe-{uuid.uuid4().hex}"

    @callback
    def on_reply(message: Any) -> None:
        try:
            reply = json.loads(message.payload)
        except (TypeError, ValueError):
            return
        if not isinstance(reply, dict):
            return
        transaction = reply.get("transaction")
        if transaction == probe:
            ready.set()
            return
        waiter = pending.get(transaction) if isinstance(transaction, str) else None
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)

    async def subscribe() -> None:
        if not await mqtt.async_wait_for_mqtt_client(hass):
            return
        await mqtt.async_subscribe(hass, f"{prefix}/response/+/{SUFFIX}/#", on_reply, qos=1)
        # Home Assistant sends subscriptions to the broker a little later: until the probe
        # comes back through the broker, a reply could pass by unseen.
        topic = f"{prefix}/response/probe/{SUFFIX}"
        while not ready.is_set():
            await mqtt.async_publish(hass, topic, json.dumps({"transaction": probe}), qos=1)
            try:
                await asyncio.wait_for(ready.wait(), 1.0)
            except TimeoutError:
                continue

    hass.async_create_background_task(subscribe(), f"{DOMAIN} subscribe")

    async def call(service: ServiceCall) -> ServiceResponse:
        method: str = service.data["method"]
        request: dict[str, Any] = dict(service.data["request"])
        timeout: float = service.data["timeout"]
        try:
            await asyncio.wait_for(ready.wait(), READY_TIMEOUT)
        except TimeoutError:
            raise HomeAssistantError("the MQTT subscription for the replies is not ready") from None
        transaction = f"ha-{uuid.uuid4().hex}"
        request["transaction"] = transaction
        waiter: asyncio.Future[dict[str, Any]] = hass.loop.create_future()
        pending[transaction] = waiter
        try:
            payload = json.dumps(request)
            await mqtt.async_publish(hass, f"{prefix}/request/{method}/{SUFFIX}", payload, qos=1)
            try:
                reply = await asyncio.wait_for(waiter, timeout)
            except TimeoutError:
                raise HomeAssistantError(f"no reply within {timeout:g} s") from None
        finally:
            pending.pop(transaction, None)
        return reply

    hass.services.async_register(
        DOMAIN, "call", call, schema=CALL_SCHEMA, supports_response=SupportsResponse.ONLY
    )
    return True
