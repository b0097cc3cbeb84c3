"""Speaking ComfyUI: its workflow files (API and UI format, PNG chunks) and its HTTP/WebSocket API.

`mapping` is the one table from ComfyUI node types to ours, `convert` turns ComfyUI documents
into Tessera workflows through it, and `api` serves ComfyUI's routes beside our own.
"""
