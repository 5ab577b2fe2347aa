"""The demo world: synthetic entities and their corpus, the agentic tasks and their grading, and the demo batch.
The model trained on it, and its training recipe, live in workspace/."""
