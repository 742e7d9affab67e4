"""Model families: one file each, holding its config, networks and losses."""

from aigc.models.gpt import GPT, GPTConfig
from aigc.models.gpt_cache import KVCache

__all__ = ["GPT", "GPTConfig", "KVCache"]
