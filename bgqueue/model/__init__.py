"""The model, bgqueue's bottom layer: what a request, an app's limits and settings, a
worker's conditions and every Redis key *are*, and the Lua scripts that change them
(`lua/`, one documented script per transition). Every other layer may import it; it
imports nothing of bgqueue but `bgqueue.errors` (docs/architecture.md)."""
