"""Gradio demo: a client of the gateway's HTTP API."""
