"""Keyword names that differ across the transformers versions latentprobe supports (see pyproject's pin).

transformers 5.25 renamed the key-value cache argument of ``Qwen2_5_VLModel.forward`` from ``past_key_values``
to ``cache`` (the old name warns with a FutureWarning on every call and goes away in 5.40); 5.23 and 5.24 know
only ``past_key_values``. The decoder passes ``past_key_values`` and `cache_keywords` renames it to what the
installed backbone accepts, so one code path runs on both ends of the pinned range without a warning.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.lru_cache(maxsize=None)
def _accepts_cache_keyword(forward_owner: type) -> bool:
    try:
        parameters = inspect.signature(forward_owner.forward).parameters
    except (TypeError, ValueError):  # a builtin or C-implemented forward: keep the old name
        return False
    return "cache" in parameters and "past_key_values" not in parameters


def cache_keywords(module: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``past_key_values`` renamed to ``cache`` where ``module``'s forward takes that name.

    >>> class New:
    ...     def forward(self, input_ids=None, cache=None): ...
    >>> cache_keywords(New(), {"past_key_values": 1, "use_cache": True})
    {'use_cache': True, 'cache': 1}
    """
    if "past_key_values" not in kwargs or not _accepts_cache_keyword(type(module)):
        return kwargs
    kwargs = dict(kwargs)
    kwargs["cache"] = kwargs.pop("past_key_values")
    return kwargs
