"""ToolSettings: the flat view of the batch config's tool section that tools read."""

from k2batch.agent.tools import ToolContext, ToolSettings
from k2batch.config import load_config


def test_settings_from_the_default_batch_config() -> None:
    tools = load_config().tools
    settings = ToolSettings.from_config(tools)
    assert settings.enabled == tools.enabled
    assert settings.search_corpus == tools.search_corpus
    assert settings.read_object_prefixes == tools.read_object_prefixes
    assert (settings.python_wall_s, settings.python_cpu_s) == (tools.python.wall_s, tools.python.cpu_s)
    assert (settings.python_memory_mb, settings.python_output_chars) == (
        tools.python.memory_mb,
        tools.python.output_chars,
    )
    assert settings.python_allow_weaker_sandbox is tools.python.allow_weaker_sandbox is False
    assert ToolContext.for_job("job-1", "draft", settings).logical_time == tools.now
