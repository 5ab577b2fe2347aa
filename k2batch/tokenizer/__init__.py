"""Tokenizers, chat-template rendering and assistant-output parsing for K2 / DeepSeek-V3 checkpoints."""

from k2batch.tokenizer.chat import render_chat
from k2batch.tokenizer.parser import ParsedAssistant, ToolCall, assistant_message, parse_assistant
from k2batch.tokenizer.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "ParsedAssistant",
    "ToolCall",
    "Tokenizer",
    "assistant_message",
    "load_tokenizer",
    "parse_assistant",
    "render_chat",
]
