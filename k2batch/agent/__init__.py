"""The agent: episodes of thinking and tool calls, and the tools they call."""
