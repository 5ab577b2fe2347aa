"""The demo model: a synthetic world and agentic tasks, a tiny K2 trained on them, and the demo batch."""
