"""media_player.ha_real_player: resolves what it is told to play, fetches it over HTTP as a
real network player would, and shows the bytes' SHA-256 and size as attributes."""

from __future__ import annotations

import hashlib
from typing import Any

from homeassistant.components import media_source
from homeassistant.components.media_player import (
    MediaPlayerEntity,
    MediaPlayerEntityFeature,
    MediaPlayerState,
    async_process_play_media_url,
)
from homeassistant.helpers.aiohttp_client import async_get_clientsession


async def async_setup_platform(hass, config, async_add_entities, discovery_info=None) -> None:
    """Add the one player."""
    async_add_entities([FetchingPlayer()])


class FetchingPlayer(MediaPlayerEntity):
    """Plays a media-source item by downloading it; idle until then."""

    _attr_name = "ha_real player"
    _attr_unique_id = "ha_real_player"
    _attr_supported_features = (
        MediaPlayerEntityFeature.PLAY_MEDIA | MediaPlayerEntityFeature.BROWSE_MEDIA
    )
    _attr_state = MediaPlayerState.IDLE

    def __init__(self) -> None:
        self._played: dict[str, Any] = {}

    @property
    def extra_state_attributes(self) -> dict[str, Any]:
        return self._played

    async def async_play_media(self, media_type: str, media_id: str, **kwargs: Any) -> None:
        """Resolve, download, record what arrived."""
        requested = media_id
        if media_source.is_media_source_id(media_id):
            item = await media_source.async_resolve_media(self.hass, media_id, self.entity_id)
            media_type, media_id = item.mime_type, item.url
        url = async_process_play_media_url(self.hass, media_id)
        async with async_get_clientsession(self.hass).get(url) as response:
            body = await response.read()
            status = response.status
        self._played = {
            "played": requested,
            "http_status": status,
            "content_type": media_type,
            "sha256": hashlib.sha256(body).hexdigest(),
            "size": len(body),
        }
        self._attr_media_content_id = requested
        self._attr_state = MediaPlayerState.PLAYING
        self.async_write_ha_state()
