"""Glue for the frameworks voice agents are built with (Pipecat; each one an optional extra)."""
