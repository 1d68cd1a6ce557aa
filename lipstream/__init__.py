"""lipstream: a real-time streaming talking-avatar server (MuseTalk v1.5 over WebRTC)."""

__version__ = "0.1.0"
