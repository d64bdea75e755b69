"""Structured output: a regular expression, a JSON schema or a context-free grammar that every generated
sequence must follow, enforced by token masks computed per step by llguidance (`GenerationConfig(constraint=...)`).
"""

from ssm_llm.constraints import awrs
from ssm_llm.constraints.matchers import Matchers
from ssm_llm.constraints.spec import Constraint, Grammar, JSONSchema, Regex, tokenizer

__all__ = ["awrs", "Constraint", "Grammar", "JSONSchema", "Matchers", "Regex", "tokenizer"]
