"""The web console: a small page the bridge serves itself (status, live requests, try, config)."""
